"""Seeded, stratified train/val/test split of the pooled images, saved as a manifest."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from sklearn.model_selection import train_test_split

from defectflow.data.mvtec import DatasetError, Sample

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitSample:
    sample: Sample
    split: str


def stratified_split(
    samples: list[Sample], train: float, val: float, test: float, seed: int
) -> list[SplitSample]:
    labels = [s.label for s in samples]
    too_few = {c: labels.count(c) for c in set(labels) if labels.count(c) < 3}
    if too_few:
        raise DatasetError(f"each class needs at least 3 images to split 3 ways; too few: {too_few}")
    train_part, rest = train_test_split(
        samples, train_size=train, stratify=labels, random_state=seed
    )
    val_share = val / (val + test)
    val_part, test_part = train_test_split(
        rest, train_size=val_share, stratify=[s.label for s in rest], random_state=seed
    )
    out = [SplitSample(s, "train") for s in train_part]
    out += [SplitSample(s, "val") for s in val_part]
    out += [SplitSample(s, "test") for s in test_part]
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
