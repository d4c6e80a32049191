"""Fitting the anomaly head on good images and choosing its threshold (training side).

Fitting (`fit_anomaly_head`, a pipeline step after training):

1. patch features of every good training image (one grid cell = one patch);
2. optionally, a fixed Gaussian random projection to `projection_dims` (distances are kept up
   to a distortion, Johnson-Lindenstrauss; cheaper, but on capsule 152 -> 64 dims cost about
   0.03 of AUROC, so the default keeps the features whole);
3. greedy k-center coreset of `bank_size` patches (PatchCore's subsampling: every good patch
   stays close to some bank entry, with a fraction of the memory and compute);
4. the bank and projection become weights of the model's anomaly head.

The threshold is chosen on the validation split's good images (`defectflow.evaluation.calibration.choose_anomaly_threshold`),
for a target false-alarm rate; never on test data. How a served model scores an image with the
fitted head is `defectflow.inference.anomaly_score`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from defectflow.data.mvtec import Sample
from defectflow.inference.preprocessing import prepare_image, read_image

log = logging.getLogger(__name__)


def random_projection(feature_dims: int, projection_dims: int, seed: int = 0) -> np.ndarray | None:
    """A (feature_dims, projection_dims) Gaussian matrix scaled to keep distances on average;
    None when no reduction is asked (projection_dims 0 or >= feature_dims)."""
    if projection_dims <= 0 or projection_dims >= feature_dims:
        return None
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((feature_dims, projection_dims)) / np.sqrt(projection_dims)).astype(
        np.float32
    )


def greedy_coreset(points: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Indices of `size` rows of `points` chosen by greedy k-center selection: each new one is
    the point farthest from those chosen so far, so every point ends near a chosen one."""
    points = np.asarray(points, dtype=np.float32)
    n = len(points)
    if size >= n:
        return np.arange(n)
    if size <= 0:
        raise ValueError(f"coreset size must be positive, got {size}")
    squared_norms = np.einsum("ij,ij->i", points, points)
    chosen = np.empty(size, dtype=np.int64)
    chosen[0] = np.random.default_rng(seed).integers(n)
    nearest = np.full(n, np.inf, dtype=np.float32)
    for i in range(size):
        if i:
            chosen[i] = int(np.argmax(nearest))
        centre = points[chosen[i]]
        distance = squared_norms - 2.0 * (points @ centre) + squared_norms[chosen[i]]
        np.minimum(nearest, distance, out=nearest)
    return chosen


def fit_memory_bank(
    features: np.ndarray, bank_size: int, projection_dims: int = 0, seed: int = 0
) -> tuple[np.ndarray | None, np.ndarray]:
    """Patch features (N, h, w, C) of good images to (projection (C, D) or None, bank (M, D))."""
    features = np.asarray(features, dtype=np.float32)
    patches = features.reshape(-1, features.shape[-1])
    projection = random_projection(patches.shape[1], projection_dims, seed)
    projected = patches if projection is None else patches @ projection
    bank = projected[greedy_coreset(projected, bank_size, seed)]
    return projection, bank


def fit_anomaly_head(
    model_dir: str | Path,
    samples: list[Sample],
    bank_size: int = 1000,
    projection_dims: int = 0,
    seed: int = 0,
    batch_size: int = 8,
) -> dict:
    """Build the memory bank from `samples` (good training images) and give the model in
    `model_dir` its anomaly head: model.keras is rewritten with the third output and
    model.json records the bank (`ModelInfo.anomaly`). Returns that record."""
    from defectflow.artifacts import MODEL_FILE, ModelInfo
    from defectflow.inference.predictor import KerasBackend
    from defectflow.models.anomaly_head import feature_extractor, with_anomaly_head

    if not samples:
        raise ValueError("no good training images to build the anomaly memory bank from")
    model_dir = Path(model_dir)
    info = ModelInfo.load(model_dir)
    started = time.perf_counter()
    model = KerasBackend(model_dir / MODEL_FILE).model
    extractor = feature_extractor(model)
    features = []
    for start in range(0, len(samples), batch_size):
        batch = np.stack(
            [
                prepare_image(read_image(s.path), info.input_size)
                for s in samples[start : start + batch_size]
            ]
        )
        features.append(np.asarray(extractor.predict_on_batch(batch), dtype=np.float32))
    features = np.concatenate(features)
    projection, bank = fit_memory_bank(features, bank_size, projection_dims, seed)
    scored = with_anomaly_head(model, projection, bank)
    tmp = model_dir / f".{MODEL_FILE}.anomaly.keras"
    scored.save(tmp)
    tmp.replace(model_dir / MODEL_FILE)
    record = {
        "method": "patch memory bank (PatchCore: nearest good patch, greedy coreset)",
        "train_images": len(samples),
        "grid": list(features.shape[1:3]),
        "patches": int(np.prod(features.shape[:3])),
        "feature_dims": int(features.shape[-1]),
        "projection_dims": 0 if projection is None else int(projection.shape[1]),
        "bank_size": int(len(bank)),
        "bank_mb": round(bank.nbytes / 1e6, 3),
        "fit_seconds": round(time.perf_counter() - started, 1),
    }
    info.anomaly = record
    info.anomaly_threshold = None  # a new bank's scores need a new threshold (calibration)
    info.save(model_dir)
    log.info(
        "anomaly memory bank: %d of %d good patches (%d dims, projected to %s) from %d images in %.1f s",
        record["bank_size"],
        record["patches"],
        record["feature_dims"],
        record["projection_dims"] or "none",
        len(samples),
        record["fit_seconds"],
    )
    return record
