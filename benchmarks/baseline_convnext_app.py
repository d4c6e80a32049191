"""The timing baseline for `benchmarks/serve_bench.py`: a plain FastAPI app serving a model
like the published one, ConvNeXt-Tiny + U-Net at 512x512 (random weights: only its speed
matters here), with the same /predict contract as the defectflow service.

    .venv/bin/python benchmarks/baseline_convnext_app.py --port 8001
    # or: .venv/bin/python -m uvicorn baseline_convnext_app:app --app-dir benchmarks --port 8001

- Model: keras.applications.ConvNeXtTiny(weights=None, include_top=False, 512x512x3) as the
  encoder; a textbook U-Net decoder (per level: 2x upsampling, the encoder's skip features
  concatenated, two 3x3 convolutions with ReLU; 256/128/64/32/16 channels) up to a 512x512
  sigmoid mask; a class head (global average pooling of the deepest features, softmax over the
  six capsule classes). Weights from a fixed seed, no training.
- Serving: one uvicorn worker, a synchronous endpoint (FastAPI runs it in its thread pool),
  the forward pass through Keras `predict_on_batch` (a compiled function, as defectflow's own
  Keras backend runs it: the baseline is not handicapped by `model.predict`'s per-call setup).
- POST /predict, multipart field `image` (PNG, JPEG, BMP or TIFF) -> JSON `class`,
  `probabilities`, `is_defective`, `defect_area_fraction`, `mask_png_base64` (PNG at the input's
  size, 255 = defect), `mask_size` ([width, height]), `model`; HTTP 400 when the upload is not
  a decodable image. GET /readyz answers 200 once the model is built and warmed up.
Only 127.0.0.1 is meant: this is a benchmark fixture, not a service.
"""

from __future__ import annotations

import argparse
import base64
import os
from contextlib import asynccontextmanager

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from fastapi import FastAPI, File, HTTPException, UploadFile  # noqa: E402

INPUT_SIZE = 512
CLASSES = ["good", "crack", "faulty_imprint", "poke", "scratch", "squeeze"]
MASK_THRESHOLD = 0.5
MODEL_NAME = "baseline-convnext-tiny-unet-512:random"
DECODER_CHANNELS = (256, 128, 64, 32, 16)


def build_model(seed: int = 0):
    """ConvNeXt-Tiny encoder + U-Net decoder at 512x512, random weights; outputs class, mask."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    encoder = keras.applications.ConvNeXtTiny(
        weights=None, include_top=False, input_shape=(INPUT_SIZE, INPUT_SIZE, 3)
    )
    # Stage outputs at strides 4, 8 and 16: the inputs of the downsampling blocks after them.
    skips = [encoder.get_layer(f"convnext_tiny_downsampling_block_{i}").input for i in (2, 1, 0)]
    deepest = encoder.output  # stride 32, 768 channels
    x = deepest
    for channels, skip in zip(DECODER_CHANNELS, [*skips, None, None], strict=True):
        x = layers.UpSampling2D(2, interpolation="bilinear")(x)
        if skip is not None:
            x = layers.Concatenate()([x, skip])
        for _ in range(2):
            x = layers.Conv2D(channels, 3, padding="same", activation="relu")(x)
    mask = layers.Conv2D(1, 1, activation="sigmoid", name="mask")(x)
    pooled = layers.GlobalAveragePooling2D()(deepest)
    class_probs = layers.Dense(len(CLASSES), activation="softmax", name="class")(pooled)
    return keras.Model(
        encoder.input, {"class": class_probs, "mask": mask}, name="convnext_tiny_unet"
    )


def decode_rgb(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if image is None:
        raise ValueError("not a decodable image: expected a PNG, JPEG, BMP or TIFF file")
    if image.dtype == np.uint16:
        image = (image / 257.0).round().astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class BaselineModel:
    def __init__(self) -> None:
        self.model = build_model()
        self.parameters = int(self.model.count_params())
        self.predict(np.zeros((64, 64, 3), np.uint8))  # warm-up: traces the compiled function

    def predict(self, image: np.ndarray) -> dict:
        height, width = image.shape[:2]
        batch = cv2.resize(image, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR)
        outputs = self.model.predict_on_batch(batch[None].astype(np.float32))
        probs = np.asarray(outputs["class"])[0].astype(np.float64)
        index = int(np.argmax(probs))
        soft = cv2.resize(
            np.asarray(outputs["mask"])[0, :, :, 0], (width, height), interpolation=cv2.INTER_LINEAR
        )
        mask = (
            (soft > MASK_THRESHOLD).astype(np.uint8)
            if index != 0
            else np.zeros((height, width), np.uint8)
        )
        ok, png = cv2.imencode(".png", mask * 255)
        if not ok:  # pragma: no cover - cv2 encodes any uint8 array
            raise RuntimeError("PNG encoding failed")
        return {
            "class": CLASSES[index],
            "probabilities": {c: round(float(p), 6) for c, p in zip(CLASSES, probs, strict=True)},
            "is_defective": index != 0,
            "defect_area_fraction": round(float(mask.mean()), 6),
            "mask_png_base64": base64.b64encode(png.tobytes()).decode("ascii"),
            "mask_size": [width, height],
            "model": MODEL_NAME,
        }


state: dict = {}


@asynccontextmanager
async def lifespan(_app: FastAPI):
    state["model"] = BaselineModel()
    yield
    state.clear()


app = FastAPI(title="baseline: ConvNeXt-Tiny + U-Net 512 (random weights)", lifespan=lifespan)


@app.get("/readyz")
def readyz() -> dict:
    if "model" not in state:
        raise HTTPException(status_code=503, detail="model not loaded")
    return {"model": MODEL_NAME, "parameters": state["model"].parameters}


@app.post("/predict")
def predict(image: UploadFile = File(...)) -> dict:  # noqa: B008 (FastAPI's declaration style)
    try:
        rgb = decode_rgb(image.file.read())
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=f"invalid image: {exc}") from exc
    return state["model"].predict(rgb)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level="warning")


if __name__ == "__main__":
    main()
