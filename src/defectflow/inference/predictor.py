"""Loading a trained model artifact and predicting with it.

What a model folder holds, and what its outputs are called, is `defectflow.artifacts`.
Evaluation, serving and the command line all predict through `Predictor`, so they share one
code path whichever of the two formats runs the forward pass.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from defectflow.artifacts import (
    ANOMALY_OUTPUT,
    FORMATS,
    MODEL_FILE,
    MODEL_INFO_FILE,
    OUTPUT_NAMES,
    TFLITE_FILE,
    ModelInfo,
)
from defectflow.inference.postprocessing import Prediction, postprocess
from defectflow.inference.preprocessing import decode_image, prepare_image


class RawOutputs(NamedTuple):
    """What the network returns for a batch, before any threshold or temperature."""

    #: Class probabilities (N, C).
    probabilities: np.ndarray
    #: Mask probabilities (N, S, S, 1) at model resolution.
    masks: np.ndarray
    #: Patch distances to the good-image memory bank (N, h, w, 1); None without an anomaly head.
    anomaly: np.ndarray | None = None


class KerasBackend:
    """The forward pass of `model.keras`."""

    format = "keras"

    def __init__(self, path: Path):
        import keras

        import defectflow.models.layers  # noqa: F401  (registers the custom layers and losses
        import defectflow.models.losses  # noqa: F401   that model.keras refers to by name)

        self.model = keras.saving.load_model(path, compile=False)

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return {
            name: np.asarray(value) for name, value in self.model.predict_on_batch(batch).items()
        }


class TFLiteBackend:
    """The forward pass of `model.tflite` (TensorFlow Lite interpreter, XNNPACK on the CPU).

    `per_image` (the default) invokes the interpreter once per image of a batch: with XNNPACK
    that is as fast as one invocation for the whole batch, a little faster even (float16
    capsule model, 2 cores: 112 vs 107 images/s at batch 8 and 16), and the input tensor keeps
    its shape (the whole-batch way resizes and reallocates it whenever the batch size changes).
    """

    format = "tflite"

    def __init__(self, path: Path, num_threads: int | None = None, per_image: bool = True):
        self.model = _tflite_interpreter(path, num_threads or _cpu_count())
        signatures = self.model.get_signature_list()
        if len(signatures) != 1:
            raise ValueError(f"{path}: expected one signature, found {sorted(signatures)}")
        ((key, signature),) = signatures.items()
        if len(signature["inputs"]) != 1:
            raise ValueError(f"{path}: expected one input (the image), found {signature['inputs']}")
        self._input = signature["inputs"][0]
        self._runner = self.model.get_signature_runner(key)
        self._names = _output_names(self._runner, path)
        self.per_image = per_image
        # An interpreter must not run two invocations at once; a server may call from threads.
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        # The runner resizes the input tensor (and reallocates) whenever the batch size changes.
        chunks = [batch[i : i + 1] for i in range(len(batch))] if self.per_image else [batch]
        collected: dict[str, list[np.ndarray]] = {name: [] for name in self._names}
        with self._lock:
            for chunk in chunks:
                outputs = self._runner(**{self._input: chunk})
                for name, signature_name in self._names.items():
                    collected[name].append(outputs[signature_name])
        return {name: np.concatenate(values) for name, values in collected.items()}


def _tflite_interpreter(path: Path, num_threads: int):
    """LiteRT's interpreter (the `ai-edge-litert` package: ~70 MB resident, no TensorFlow), else
    TensorFlow's own `tf.lite.Interpreter` (the same runtime, but importing all of TensorFlow)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        with warnings.catch_warnings():
            # TF 2.21 announces that tf.lite.Interpreter moves to ai_edge_litert: known, see above.
            warnings.filterwarnings(
                "ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated", category=UserWarning
            )
            return tf.lite.Interpreter(model_path=str(path), num_threads=num_threads)
    return Interpreter(model_path=str(path), num_threads=num_threads)


def _output_names(runner, path: Path) -> dict[str, str]:
    """Model output name -> signature output name: by name when the export kept the names
    (it does, from the Keras model's output dict), else by rank, class (N, C) vs mask (N, H, W, 1)."""
    details = runner.get_output_details()
    if set(OUTPUT_NAMES) <= set(details):
        return {name: name for name in (*OUTPUT_NAMES, ANOMALY_OUTPUT) if name in details}
    by_rank = {len(d["shape_signature"]): name for name, d in details.items()}
    if len(details) == 2 and set(by_rank) == {2, 4}:
        return {"class": by_rank[2], "mask": by_rank[4]}
    raise ValueError(
        f"{path}: cannot tell the class and mask outputs apart among {sorted(details)}"
    )


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Predictor:
    def __init__(self, backend, info: ModelInfo):
        #: Batch (N, S, S, 3) float32 in [0, 255] -> {"class": probs (N, C), "mask": probs
        #: (N, S, S, 1)[, "anomaly": patch distances (N, h, w, 1)]}.
        self.backend = backend
        self.info = info

    @classmethod
    def load(cls, model_dir: str | Path, format: str | None = None) -> Predictor:
        """The model in `model_dir`, run as `format` (keras | tflite); None: the format its
        model.json chose for serving (keras unless an export chose tflite)."""
        model_dir = Path(model_dir)
        if not (model_dir / MODEL_INFO_FILE).exists():
            raise FileNotFoundError(
                f"{model_dir} is not a defectflow model: missing {MODEL_INFO_FILE}"
            )
        info = ModelInfo.load(model_dir)
        format = format or info.serving_format
        if format not in FORMATS:
            raise ValueError(
                f"unknown model format {format!r}: expected one of {', '.join(FORMATS)}"
            )
        if format == "tflite":
            if not (model_dir / TFLITE_FILE).exists():
                raise FileNotFoundError(
                    f"{model_dir} has no {TFLITE_FILE}: export it first "
                    "(defectflow.training.export.export_tflite) or load format='keras'"
                )
            return cls(TFLiteBackend(model_dir / TFLITE_FILE), info)
        if not (model_dir / MODEL_FILE).exists():
            raise FileNotFoundError(f"{model_dir} is not a defectflow model: missing {MODEL_FILE}")
        return cls(KerasBackend(model_dir / MODEL_FILE), info)

    @property
    def format(self) -> str:
        return self.backend.format

    @property
    def model(self):
        """The underlying keras.Model or tf.lite.Interpreter."""
        return self.backend.model

    @property
    def classes(self) -> list[str]:
        return self.info.classes

    @property
    def has_anomaly_head(self) -> bool:
        """Whether the network returns an anomaly map (the threshold may still be unset)."""
        return self.info.anomaly is not None

    def raw_outputs(self, images: list[np.ndarray], batch_size: int = 8) -> RawOutputs:
        """The network's class probabilities (N, C), before the temperature (`predictions`
        applies it), mask probabilities (N, S, S, 1) at model resolution and, with an anomaly
        head, the anomaly maps (N, h, w, 1)."""
        outputs: dict[str, list[np.ndarray]] = {}
        size = self.info.input_size
        for start in range(0, len(images), batch_size):
            batch = np.stack(
                [prepare_image(img, size) for img in images[start : start + batch_size]]
            )
            for name, value in self.backend(batch).items():
                outputs.setdefault(name, []).append(value)
        joined = {name: np.concatenate(values) for name, values in outputs.items()}
        return RawOutputs(joined["class"], joined["mask"], joined.get(ANOMALY_OUTPUT))

    def predictions(
        self,
        images: list[np.ndarray],
        probs: np.ndarray,
        masks: np.ndarray,
        anomaly: np.ndarray | None = None,
    ) -> list[Prediction]:
        """`raw_outputs` of `images` to predictions at each image's own resolution: the one place
        where the model's decision policy (temperature and thresholds) is applied, for evaluation, the command line and serving alike. `anomaly` None: the
        classifier alone decides (as for a model without an anomaly head)."""
        policy = self.info.policy
        maps = anomaly if anomaly is not None else [None] * len(images)
        return [
            postprocess(p, m, img.shape[:2], policy, anomaly_map=a)
            for p, m, a, img in zip(probs, masks, maps, images, strict=True)
        ]

    def predict_arrays(self, images: list[np.ndarray], batch_size: int = 8) -> list[Prediction]:
        """RGB uint8 images of any size to predictions at each image's own resolution."""
        if not images:
            return []
        return self.predictions(images, *self.raw_outputs(images, batch_size))

    def predict_bytes(self, data: bytes) -> Prediction:
        """An uploaded file to a prediction; InvalidImageError when it is not an image."""
        return self.predict_arrays([decode_image(data)])[0]
