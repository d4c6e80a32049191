"""What the HTTP service needs beyond the Predictor, kept free of HTTP and BentoML.

- `ServingSettings`: the `serve:` section of the served model's config, with the
  DEFECTFLOW_SERVE_OVERRIDES environment variable ("serve.max_upload_bytes=1000 ...") on top.
- `pack_outputs` / `unpack_outputs`: the model's outputs in one array, so one batched
  forward pass (BentoML adaptive batching splits a batch's output along the first axis) can
  carry the class probabilities, the mask and the anomaly map.
- `prediction_record` and `json_log_line`: the structured log line of one prediction.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectflow.artifacts import ANOMALY_OUTPUT, CONFIG_FILE, METRICS_FILE, ModelInfo
from defectflow.preprocessing import Prediction, encode_png, overlay

OVERRIDES_ENV = "DEFECTFLOW_SERVE_OVERRIDES"


@dataclass
class ServingSettings:
    serve: object  # the `serve` DictConfig
    config_sha256: str

    @classmethod
    def for_model(cls, model_dir: Path) -> ServingSettings:
        """The model's own config (schema defaults for keys an older model lacks) + overrides."""
        import hashlib

        from omegaconf import OmegaConf

        from defectflow.config import ConfigError, from_yaml

        path = Path(model_dir) / CONFIG_FILE
        text = path.read_text() if path.exists() else ""
        cfg = from_yaml(text)
        overrides = os.environ.get(OVERRIDES_ENV, "").split()
        bad = [o for o in overrides if not o.startswith("serve.") or "=" not in o]
        if bad:
            raise ConfigError(f"{OVERRIDES_ENV} takes serve.key=value pairs, got: {' '.join(bad)}")
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        return cls(serve=cfg.serve, config_sha256=hashlib.sha256(text.encode()).hexdigest())


def pack_outputs(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """A backend's outputs, class (N, C), mask (N, S, S, 1) and, with an anomaly head, anomaly
    (N, h, w, 1), to one float32 (N, C + S*S [+ h*w]) array."""
    names = ("class", "mask", ANOMALY_OUTPUT) if ANOMALY_OUTPUT in outputs else ("class", "mask")
    n = outputs["class"].shape[0]
    return np.concatenate([outputs[name].reshape(n, -1) for name in names], axis=1).astype(np.float32)


def unpack_outputs(packed: np.ndarray, n_classes: int, size: int, anomaly_grid: tuple[int, int] | None = None
                   ) -> dict[str, np.ndarray]:
    """`pack_outputs` undone, given the class count, the mask side and the anomaly map's grid."""
    packed = np.asarray(packed)
    cells = int(np.prod(anomaly_grid)) if anomaly_grid else 0
    if packed.ndim != 2 or packed.shape[1] != n_classes + size * size + cells:
        raise ValueError(f"model output of shape {packed.shape} does not fit {n_classes} classes, a {size}px mask"
                         + (f" and a {anomaly_grid[0]}x{anomaly_grid[1]} anomaly map" if cells else ""))
    outputs = {"class": packed[:, :n_classes],
               "mask": packed[:, n_classes : n_classes + size * size].reshape(-1, size, size, 1)}
    if cells:
        outputs[ANOMALY_OUTPUT] = packed[:, n_classes + size * size :].reshape(-1, *anomaly_grid, 1)
    return outputs


def answer(prediction: Prediction, image: np.ndarray, model_tag: str, with_overlay: bool = False) -> dict:
    """The JSON answer for one image."""
    out = {**prediction.to_json(), "model": model_tag}
    if with_overlay:
        import cv2

        painted = overlay(image, prediction.mask, (255, 0, 0), 0.5)
        out["overlay_png_base64"] = encode_png(cv2.cvtColor(painted, cv2.COLOR_RGB2BGR))
    return out


def metadata(model_tag: str, stage: str | None, model_dir: Path, info: ModelInfo, settings: ServingSettings) -> dict:
    """What `GET /metadata` answers: enough to know exactly what is serving."""
    try:
        metrics = json.loads((Path(model_dir) / METRICS_FILE).read_text())
    except (OSError, ValueError):
        metrics = {}
    headline = ("accuracy", "presence_accuracy", "defect_accuracy", "auroc", "defect_dice", "defect_iou",
                "anomaly_auroc", "detection_auroc", "false_alarm_rate")
    return {
        "model": model_tag,
        "stage": stage,
        "classes": info.classes,
        "input_size": info.input_size,
        "serving_format": info.serving_format,
        "thresholds": {"defect": info.defect_threshold, "mask": info.mask_threshold, "anomaly": info.anomaly_threshold,
                       "from": info.thresholds_from},
        # Images the classifier calls good but whose anomaly score exceeds its threshold come
        # back "unknown_defect"; None: no anomaly head (the classifier alone decides).
        "anomaly": info.anomaly,
        # Answers whose calibrated confidence is below the threshold come back "uncertain".
        "confidence_threshold": info.confidence_threshold,
        "temperature": info.temperature,
        "metrics": {k: metrics[k] for k in headline if k in metrics},
        "config_sha256": settings.config_sha256,
        "limits": {"max_upload_bytes": settings.serve.max_upload_bytes, "max_pixels": settings.serve.max_pixels,
                   "allowed_formats": list(settings.serve.allowed_formats),
                   "max_batch_images": settings.serve.max_batch_images},
    }


def prediction_record(request_id: str, endpoint: str, model_tag: str, started: float, image: np.ndarray | None,
                      result: dict | None, status: int, error: str | None = None) -> dict:
    record = {
        "event": "prediction",
        "request_id": request_id,
        "endpoint": endpoint,
        "model": model_tag,
        "status": status,
        "latency_ms": round((time.perf_counter() - started) * 1000.0, 2),
    }
    if image is not None:
        record["image_size"] = [int(image.shape[1]), int(image.shape[0])]
    if result is not None:
        record["class"] = result["class"]
        # An unknown_defect answer has no class probability of its own: only `confidence`.
        confidence = result["confidence"] if "confidence" in result else result["probabilities"][result["class"]]
        record["confidence"] = round(float(confidence), 6)
        if "status" in result:
            record["answer_status"] = result["status"]
    if error is not None:
        record["error"] = error
    return record


def json_log_line(record: dict) -> str:
    return json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}, separators=(",", ":"))
