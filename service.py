"""The defectflow HTTP service (BentoML 1.4): POST an image, get its defect class and mask.

    bentoml serve service:DefectInspection        # from the repository: the production model
    bentoml serve defectflow:latest                # a built Bento (see defectflow.registry)

The model is the one a built Bento pins (Bento argument `model_tag`), else the
DEFECTFLOW_MODEL_TAG environment variable, else the production model of the registry
(`defectflow models list`) — never simply the newest model in the store.
All logic lives in the `defectflow` package; this file only wires it to HTTP.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import bentoml
from pydantic import Field

from defectflow.preprocessing import InvalidImageError
from defectflow.registry import MODEL_TAG_ENV, production_tag


def _model_tag() -> str:
    pinned = getattr(bentoml.use_arguments(), "model_tag", None) or os.environ.get(MODEL_TAG_ENV)
    if pinned:
        return pinned
    production = production_tag()
    if production is None:
        raise RuntimeError("no production model in the registry: train one (`defectflow train`) or promote "
                           f"one (`defectflow models promote TAG`), or set {MODEL_TAG_ENV}")
    return production


MODEL_TAG = _model_tag()


@bentoml.service(name="defectflow", workers=1, traffic={"timeout": 60})
class DefectInspection:
    # A class-level model reference: `bentoml build` packs this model into the Bento.
    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        from defectflow.inference import Predictor  # Keras/TensorFlow load here, not at build

        self.model_tag = str(self.model_ref.tag)
        self.predictor = Predictor.load(self.model_ref.path)

    @bentoml.api(route="/predict")
    def predict(
        self,
        image: Annotated[
            Path, Field(description="The image file (PNG, JPEG, BMP or TIFF; 8 or 16 bit).")
        ],
        ctx: bentoml.Context,
    ) -> dict:
        """Classify an image and localise its defect. Send the image as multipart/form-data
        field `image` (PNG, JPEG, BMP or TIFF). The answer: `class` (the most likely class),
        `probabilities` (per class, summing to 1), `is_defective`, `defect_area_fraction`,
        `mask_png_base64` (a PNG mask at the input's size, 255 = defect), `mask_size`
        ([width, height]) and `model` (the model tag). An upload that is not a decodable
        image gets HTTP 400 and {"error": "..."}.
        """
        try:
            prediction = self.predictor.predict_bytes(image.read_bytes())
        except InvalidImageError as exc:
            # Not `raise InvalidArgument`: BentoML 1.4.39 answers those with a JSON list.
            ctx.response.status_code = 400
            return {"error": f"invalid image: {exc}"}
        return {**prediction.to_json(), "model": self.model_tag}
