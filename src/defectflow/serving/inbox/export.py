"""Export: a reviewed item into the incoming dataset, with its provenance.

The incoming dataset has the MVTec layout, exactly as `defectflow.data.mvtec.scan_dataset`
reads it:

    good      -> incoming/train/good/inbox-<id>.<ext>
    <defect>  -> incoming/test/<defect>/inbox-<id>.<ext>
                 incoming/ground_truth/<defect>/inbox-<id>_mask.png   (255 = defect)

and each item written appends one line to `incoming/provenance.jsonl`: the inbox id, the files,
the label and mask choice, who reviewed and how that identity was established (`identity`), every
vote (`votes`), the review policy in force (`policy`: min_reviews, trusted_reviewers) and how it
was met (`met_by`: agreement | trusted), when, and the original prediction and model.
`defectflow.data.mvtec.scan_training_data` takes an incoming image for training only when such
a line names it and its votes meet the policy it records. This module only writes: the checks
and the votes come first (`review`). It is in the Bento: it must not import defectflow.data.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time as _time
from dataclasses import dataclass
from pathlib import Path

from defectflow.files import atomic_write

PROVENANCE_FILE = "provenance.jsonl"


@dataclass(frozen=True)
class DatasetPaths:
    """Where a reviewed item goes, relative to the incoming dataset folder."""

    image: Path
    #: None for the good class.
    mask: Path | None


def dataset_paths(item_id: str, image_suffix: str, label: str, good: str) -> DatasetPaths:
    stem = f"inbox-{item_id}"
    if label == good:
        return DatasetPaths(Path("train") / good / f"{stem}{image_suffix}", None)
    return DatasetPaths(
        Path("test") / label / f"{stem}{image_suffix}",
        Path("ground_truth") / label / f"{stem}_mask.png",
    )


def write_into_dataset(
    incoming: Path,
    paths: DatasetPaths,
    image_data: bytes,
    mask_png: bytes | None,
    written: list[Path],
) -> None:
    """Write the mask, then the image (the dataset never holds a defect image without its
    mask), each atomically; every file written is appended to `written`, for the caller to
    remove should the review fail after all."""
    if paths.mask is not None:
        assert mask_png is not None
        atomic_write(incoming / paths.mask, mask_png)
        written.append(incoming / paths.mask)
    atomic_write(incoming / paths.image, image_data)
    written.append(incoming / paths.image)


def provenance_entry(
    item_id: str,
    paths: DatasetPaths,
    label: str,
    mask_source: str,
    reviewer: str,
    reviewed_at: float,
    record: dict,
    trust: dict | None = None,
) -> dict:
    """The provenance line of a review: the files written, the review, the original prediction
    (`record`, as the inbox stored it); `trust` adds identity, mask_choice, votes, policy and
    met_by."""
    return {
        "inbox_id": item_id,
        "image": str(paths.image),
        "mask": str(paths.mask) if paths.mask else None,
        "label": label,
        "mask_source": mask_source,
        "reviewer": reviewer,
        "reviewed_at": reviewed_at,
        "reviewed_at_iso": _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime(reviewed_at)),
        "predicted_class": record["class"],
        "probabilities": record["probabilities"],
        "confidence": record["confidence"],
        "prediction_status": record["status"],
        "model": record["model"],
        "predicted_at": record["time"],
        "request_id": record.get("request_id"),
        **(trust or {}),
    }


def append_provenance(incoming: Path, entry: dict) -> None:
    """One JSON line, appended with one write under an exclusive lock, then fsynced."""
    incoming.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, separators=(",", ":")) + "\n").encode("utf-8")
    fd = os.open(incoming / PROVENANCE_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.write(fd, line) != len(line):
            raise OSError(f"short write to {incoming / PROVENANCE_FILE}")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_provenance(incoming: str | Path) -> list[dict]:
    """The provenance lines of an incoming dataset (a line cut short by a crash is skipped)."""
    path = Path(incoming) / PROVENANCE_FILE
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return entries
