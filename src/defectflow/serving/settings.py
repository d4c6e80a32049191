"""What the HTTP service needs beyond the Predictor, kept free of HTTP and BentoML.

- `ServingSettings`: the `serve:` section of the served model's config, with the
  DEFECTFLOW_SERVE_OVERRIDES environment variable ("serve.max_upload_bytes=1000 ...") on top.
- `pack_outputs` / `unpack_outputs`: the model's outputs in one array, so one batched
  forward pass (BentoML adaptive batching splits a batch's output along the first axis) can
  carry the class probabilities, the mask and the anomaly map.
- `prediction_record` and `json_log_line`: the structured log line of one prediction.
- `PixelBudget`: decoded pixels per request and in flight, reserved before decoding.
- `review_access`: whether the review API may be served without a token, decided at start.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectflow.artifacts import (
    ANOMALY_OUTPUT,
    CONFIG_FILE,
    HEADLINE_METRICS,
    METRICS_FILE,
    ModelInfo,
)
from defectflow.inference.postprocessing import Prediction, encode_png, overlay
from defectflow.serving.uploads import UploadRejected

OVERRIDES_ENV = "DEFECTFLOW_SERVE_OVERRIDES"
#: What a 503 for a full pixel budget tells the client to wait: about what one request at the
#: largest allowed size holds its pixels (a 40 M pixel image took 1.1 s here to decode and answer).
RETRY_AFTER_S = 2


class ServerBusy(Exception):
    """A request refused for now, not for what it is: answer 503 with `Retry-After`."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PixelBudget:
    """How many decoded pixels one request may need (`max_request_pixels`) and all requests
    in flight may hold at once (`max_inflight_pixels`); thread-safe.

    A request reserves the pixels its images' headers declare (`uploads.check_upload`), before
    decoding any, for as long as it holds decoded images or full-size masks: `reserve` refuses
    a request over its own budget (UploadRejected 413: it will never fit) and one that would
    push the process over its budget (ServerBusy 503: it fits later), and always gives the
    pixels back when the `with` block ends, however it ends.
    """

    def __init__(
        self, max_request_pixels: int, max_inflight_pixels: int, retry_after_s: int = RETRY_AFTER_S
    ) -> None:
        if not 1 <= max_request_pixels <= max_inflight_pixels:
            raise ValueError(
                "max_request_pixels must be >= 1 and at most max_inflight_pixels (a larger request "
                f"could never be served), got {max_request_pixels} and {max_inflight_pixels}"
            )
        self.max_request_pixels = int(max_request_pixels)
        self.max_inflight_pixels = int(max_inflight_pixels)
        self.retry_after_s = int(retry_after_s)
        self._lock = threading.Lock()
        self._in_flight = 0

    @classmethod
    def from_config(cls, serve_cfg) -> PixelBudget:
        """From the `serve` section of a config (a DictConfig or a `ServeConfig`)."""
        return cls(int(serve_cfg.max_request_pixels), int(serve_cfg.max_inflight_pixels))

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        pixels = int(pixels)
        if pixels > self.max_request_pixels:
            raise UploadRejected(
                413,
                f"the images of this request decode to {pixels} pixels, more than the limit "
                f"of {self.max_request_pixels} pixels per request: send fewer or smaller images",
            )
        with self._lock:
            if self._in_flight + pixels > self.max_inflight_pixels:
                raise ServerBusy(
                    f"the service is busy: {self._in_flight} of its {self.max_inflight_pixels} decoded "
                    f"pixels are in use and this request needs {pixels}: retry in "
                    f"{self.retry_after_s} s",
                    self.retry_after_s,
                )
            self._in_flight += pixels
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= pixels


class ReviewAccessRefused(RuntimeError):
    """The review inbox is on, no token is set and anonymous review is not allowed."""


def review_access(serve_cfg, token: str | None) -> str:
    """How the review API (/review, which writes training data) is guarded, decided at start:
    "off" (the inbox is off), "token_required" (a bearer token is set) or "anonymous_allowed"
    (no token, and `serve.inbox.allow_anonymous_review` says so). With the inbox on, no token
    and no such permission, ReviewAccessRefused: the service must not start."""
    if not serve_cfg.inbox.enabled:
        return "off"
    if token:  # empty counts as unset, as for the bearer-token middleware
        return "token_required"
    if serve_cfg.inbox.allow_anonymous_review:
        return "anonymous_allowed"
    name = serve_cfg.auth_token_env
    raise ReviewAccessRefused(
        f"refusing to start: the review inbox is on (serve.inbox.enabled) but {name} is not set, so anyone "
        "could label images into the training data through /review. Set the bearer token in the environment "
        f"variable {name} (serve.auth_token_env), or allow anonymous review explicitly with "
        "serve.inbox.allow_anonymous_review=true"
    )


#: The start log line of each `review_access` answer.
REVIEW_ACCESS_MESSAGES = {
    "off": "review inbox off: /review answers 404",
    "token_required": "review inbox on: the review API requires the bearer token",
    "anonymous_allowed": "review inbox on WITHOUT a token: anonymous review allowed "
    "(serve.inbox.allow_anonymous_review=true), anyone reaching /review can label training data",
}


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
    return np.concatenate([outputs[name].reshape(n, -1) for name in names], axis=1).astype(
        np.float32
    )


def unpack_outputs(
    packed: np.ndarray, n_classes: int, size: int, anomaly_grid: tuple[int, int] | None = None
) -> dict[str, np.ndarray]:
    """`pack_outputs` undone, given the class count, the mask side and the anomaly map's grid."""
    packed = np.asarray(packed)
    cells = int(np.prod(anomaly_grid)) if anomaly_grid else 0
    if packed.ndim != 2 or packed.shape[1] != n_classes + size * size + cells:
        raise ValueError(
            f"model output of shape {packed.shape} does not fit {n_classes} classes, a {size}px mask"
            + (f" and a {anomaly_grid[0]}x{anomaly_grid[1]} anomaly map" if cells else "")
        )
    outputs = {
        "class": packed[:, :n_classes],
        "mask": packed[:, n_classes : n_classes + size * size].reshape(-1, size, size, 1),
    }
    if cells:
        outputs[ANOMALY_OUTPUT] = packed[:, n_classes + size * size :].reshape(-1, *anomaly_grid, 1)
    return outputs


def answer(
    prediction: Prediction, image: np.ndarray, model_tag: str, with_overlay: bool = False
) -> dict:
    """The JSON answer for one image."""
    out = {**prediction.to_json(), "model": model_tag}
    if with_overlay:
        import cv2

        painted = overlay(image, prediction.mask, (255, 0, 0), 0.5)
        out["overlay_png_base64"] = encode_png(cv2.cvtColor(painted, cv2.COLOR_RGB2BGR))
    return out


def metadata(
    model_tag: str, stage: str | None, model_dir: Path, info: ModelInfo, settings: ServingSettings
) -> dict:
    """What `GET /metadata` answers: enough to know exactly what is serving."""
    try:
        metrics = json.loads((Path(model_dir) / METRICS_FILE).read_text())
    except (OSError, ValueError):
        metrics = {}
    headline = (
        *(k for k in HEADLINE_METRICS if k not in ("dice", "iou")),
        "anomaly_auroc",
        "detection_auroc",
        "false_alarm_rate",
    )
    return {
        "model": model_tag,
        "stage": stage,
        "classes": info.classes,
        "input_size": info.input_size,
        "serving_format": info.serving_format,
        "thresholds": {
            "defect": info.defect_threshold,
            "mask": info.mask_threshold,
            "anomaly": info.anomaly_threshold,
            "from": info.thresholds_from,
        },
        # Images the classifier calls good but whose anomaly score exceeds its threshold come
        # back "unknown_defect"; None: no anomaly head (the classifier alone decides).
        "anomaly": info.anomaly,
        # Answers whose calibrated confidence is below the threshold come back "uncertain".
        "confidence_threshold": info.confidence_threshold,
        # And, when true, answers the anomaly score contradicts, whatever their confidence.
        "anomaly_agreement": info.anomaly_agreement,
        "temperature": info.temperature,
        "metrics": {k: metrics[k] for k in headline if k in metrics},
        "config_sha256": settings.config_sha256,
        "limits": {
            "max_upload_bytes": settings.serve.max_upload_bytes,
            "max_pixels": settings.serve.max_pixels,
            "allowed_formats": list(settings.serve.allowed_formats),
            "max_batch_images": settings.serve.max_batch_images,
            "max_request_pixels": settings.serve.max_request_pixels,
            "max_inflight_pixels": settings.serve.max_inflight_pixels,
        },
    }


def prediction_record(
    request_id: str,
    endpoint: str,
    model_tag: str,
    started: float,
    image: np.ndarray | None,
    result: dict | None,
    status: int,
    error: str | None = None,
) -> dict:
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
        confidence = (
            result["confidence"]
            if "confidence" in result
            else result["probabilities"][result["class"]]
        )
        record["confidence"] = round(float(confidence), 6)
        if "status" in result:
            record["answer_status"] = result["status"]
        if result.get("anomaly_score") is not None:  # what the nightly drift check compares
            record["anomaly_score"] = result["anomaly_score"]
    if error is not None:
        record["error"] = error
    return record


def json_log_line(record: dict) -> str:
    return json.dumps(
        {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}, separators=(",", ":")
    )
