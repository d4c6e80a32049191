"""Seeded, stratified train/val/test split of the pooled images, saved as a manifest."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectflow.data.mvtec import DatasetError, Sample

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitSample:
    sample: Sample
    split: str


def stratified_split(
    samples: list[Sample], train: float, val: float, test: float, seed: int
) -> list[SplitSample]:
    """Split each class on its own: every class is in every split, in the given proportions.

    (scikit-learn's stratified splitter rounds over the whole set and can leave a small
    class out of validation or test; per-class rounding cannot.)
    """
    by_class: dict[str, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: str(s.path)):
        by_class.setdefault(s.label, []).append(s)
    too_few = {c: len(v) for c, v in by_class.items() if len(v) < 3}
    if too_few:
        raise DatasetError(f"each class needs at least 3 images to split 3 ways; too few: {too_few}")
    rng = np.random.default_rng(seed)
    out: list[SplitSample] = []
    for label in sorted(by_class):
        members = by_class[label]
        order = rng.permutation(len(members))
        n = len(members)
        n_test = max(1, round(n * test))
        n_val = max(1, round(n * val))
        n_val = min(n_val, n - n_test - 1)
        parts = (("test", order[:n_test]), ("val", order[n_test : n_test + n_val]),
                 ("train", order[n_test + n_val :]))
        out += [SplitSample(members[i], name) for name, idx in parts for i in idx]
    return sorted(out, key=lambda x: (SPLITS.index(x.split), str(x.sample.path)))


MANIFEST_FIELDS = ("path", "label", "split", "mask_path", "origin")


def write_manifest(rows: list[SplitSample], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        for r in rows:
            s = r.sample
            writer.writerow(
                {
                    "path": str(s.path),
                    "label": s.label,
                    "split": r.split,
                    "mask_path": str(s.mask_path) if s.mask_path else "",
                    "origin": s.origin,
                }
            )
    return path


def read_manifest(path: Path) -> list[SplitSample]:
    with path.open(newline="") as fh:
        return [
            SplitSample(
                Sample(Path(r["path"]), r["label"], Path(r["mask_path"]) if r["mask_path"] else None, r["origin"]),
                r["split"],
            )
            for r in csv.DictReader(fh)
        ]


def select(rows: list[SplitSample], split: str) -> list[Sample]:
    return [r.sample for r in rows if r.split == split]
