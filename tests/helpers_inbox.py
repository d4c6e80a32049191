"""Inbox items for the inbox and review tests: a PNG, a random image, and an uncertain answer
as the service queues it (its mask a box, none for `good`)."""

from __future__ import annotations

import base64

import cv2
import numpy as np

CLASSES = ["good", "crack", "poke"]


def png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def image(seed: int, h: int = 40, w: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def answer(
    label: str = "crack",
    h: int = 40,
    w: int = 56,
    mask: np.ndarray | None = None,
    model: str | None = None,
) -> dict:
    if mask is None:
        mask = np.zeros((h, w), np.uint8)
        if label != "good":
            mask[5:15, 10:30] = 255
    probs = {c: 0.2 for c in CLASSES}
    probs[label] = 0.6
    return {
        "class": label,
        "probabilities": probs,
        "is_defective": label != "good",
        "confidence": 0.6,
        "status": "uncertain",
        "mask_png_base64": base64.b64encode(png(mask)).decode(),
        "mask_size": [w, h],
        **({"model": model} if model else {}),
    }
