"""Reading a dataset in MVTec AD layout.

    <root>/train/good/*.png
    <root>/test/<class>/*.png
    <root>/ground_truth/<class>/<stem>_mask.png

Class names come from the folders, `good` is the defect-free class, masks pair by file name.
Train and test images are pooled: defectflow makes its own stratified split.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
#: The review inbox's record of what it wrote into the incoming dataset (one JSON line per
#: image; written by `defectflow.serving.inbox.export`, which this package may not import).
PROVENANCE_FILE = "provenance.jsonl"
#: Images named in the warning about incoming images left out.
_NAMED_IN_WARNING = 20


class DatasetError(ValueError):
    """The folder is not a usable MVTec-layout dataset."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    #: None for good images, and for a defect image whose mask is missing (validation flags it).
    mask_path: Path | None
    #: The MVTec folder it came from: "train" or "test".
    origin: str


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _find_mask(root: Path, label: str, image: Path) -> Path | None:
    folder = root / "ground_truth" / label
    for suffix in (".png", image.suffix, ".bmp", ".tif", ".tiff", ".jpg"):
        candidate = folder / f"{image.stem}_mask{suffix}"
        if candidate.exists():
            return candidate
    return None


def scan_dataset(root: str | Path, good_class: str = "good") -> list[Sample]:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    if not (root / "test").is_dir() and not (root / "train").is_dir():
        raise DatasetError(
            f"{root} is not in MVTec AD layout: expected train/{good_class}/ and test/<class>/ folders"
        )
    samples: list[Sample] = []
    train_good = root / "train" / good_class
    if train_good.is_dir():
        samples += [Sample(p, good_class, None, "train") for p in _images(train_good)]
    test = root / "test"
    for class_dir in sorted(d for d in test.iterdir() if d.is_dir()) if test.is_dir() else []:
        label = class_dir.name
        for image in _images(class_dir):
            mask = None if label == good_class else _find_mask(root, label, image)
            samples.append(Sample(image, label, mask, "test"))
    if not samples:
        raise DatasetError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    return samples


def scan_training_data(
    root: str | Path, good_class: str = "good", incoming: str | Path | None = None
) -> list[Sample]:
    """The dataset at `root`, plus the reviewed images of `incoming` (the same layout) when that
    folder holds any. Their origin is prefixed "incoming/", so a file name used in both stays
    two samples (and the data version changes with every reviewed image).

    An incoming image joins only when a line of `incoming/provenance.jsonl` names it and its
    votes meet the review policy recorded there (`_meets_recorded_policy`); any other (a file
    copied in by hand, a line edited) is left out with one warning naming them, so a nightly
    run never fails on it."""
    samples = scan_dataset(root, good_class)
    if not incoming or not Path(incoming).is_dir():
        return samples
    if not any(
        p.suffix.lower() in IMAGE_SUFFIXES for p in Path(incoming).rglob("*") if p.is_file()
    ):
        return samples  # created, nothing reviewed yet
    if Path(incoming).resolve() == Path(root).resolve():
        raise DatasetError(
            f"data.incoming is data.root ({root}): reviewed images must go to a folder of their own"
        )
    incoming = Path(incoming)
    provenance = _provenance(incoming)
    reviewed, left_out = [], []
    for s in scan_dataset(incoming, good_class):
        name = s.path.relative_to(incoming).as_posix()
        entry = provenance.get(name)
        if entry is None or not _meets_recorded_policy(entry):
            left_out.append(name if entry is None else f"{name} (votes short of its policy)")
            continue
        reviewed.append(Sample(s.path, s.label, s.mask_path, f"incoming/{s.origin}"))
    if left_out:
        more = len(left_out) - _NAMED_IN_WARNING
        log.warning(
            "%d image(s) of %s left out of training: no entry in %s meeting the review policy "
            "(a reviewed item gets one when the inbox writes it): %s",
            len(left_out),
            incoming,
            PROVENANCE_FILE,
            ", ".join(left_out[:_NAMED_IN_WARNING]) + (f" and {more} more" if more > 0 else ""),
        )
    return samples + reviewed


def _provenance(incoming: Path) -> dict[str, dict]:
    """The provenance entries of an incoming dataset by image path (relative, "/"); a line cut
    short by a crash, or not an entry, is skipped."""
    path = incoming / PROVENANCE_FILE
    entries: dict[str, dict] = {}
    if not path.is_file():
        return entries
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("image"), str):
            entries[Path(entry["image"]).as_posix()] = entry
    return entries


def _meets_recorded_policy(entry: dict) -> bool:
    """Whether a provenance entry's votes meet the review policy it records: at least
    `min_reviews` distinct reviewers voted its label and mask choice, or one of them is a
    trusted reviewer identified by their own token. An entry from before votes (no `policy`:
    one review was the rule) needs a named reviewer. The rule is
    `defectflow.serving.inbox.trust.ReviewPolicy`'s, checked again here from the record."""
    policy = entry.get("policy")
    if policy is None:
        return isinstance(entry.get("reviewer"), str) and bool(entry["reviewer"].strip())
    try:
        min_reviews = int(policy["min_reviews"])
        trusted = set(policy.get("trusted_reviewers") or ())
        choice = (entry["label"], entry["mask_choice"])
        agreeing = [v for v in entry["votes"] if (v["label"], v["mask"]) == choice]
        names = {str(v["reviewer"]) for v in agreeing}
        by_trusted = any(v["identity"] == "token" and v["reviewer"] in trusted for v in agreeing)
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    return by_trusted or (min_reviews >= 1 and len(names) >= min_reviews)


def class_names(samples: list[Sample], good_class: str = "good") -> list[str]:
    """`good` first (index 0 means defect-free), then the defect classes in sorted order."""
    labels = {s.label for s in samples}
    if good_class not in labels:
        raise DatasetError(f"no {good_class!r} images found: the defect-free class is required")
    return [good_class] + sorted(labels - {good_class})


def class_counts(samples: list[Sample]) -> dict[str, int]:
    return dict(sorted(Counter(s.label for s in samples).items()))


def labelled_samples(root: Path, paths: set[Path], good_class: str = "good") -> list:
    """The MVTec-layout samples of `root` (class from the folder, mask from ground_truth) among
    `paths` (resolved): what `--score` compares the answers with."""
    return [s for s in scan_dataset(root, good_class) if s.path.resolve() in paths]
