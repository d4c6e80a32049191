"""Reading a dataset in MVTec AD layout.

    <root>/train/good/*.png
    <root>/test/<class>/*.png
    <root>/ground_truth/<class>/<stem>_mask.png

Class names come from the folders, `good` is the defect-free class, masks pair by file name.
Train and test images are pooled: defectflow makes its own stratified split.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


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
    two samples (and the data version changes with every reviewed image)."""
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
    return samples + [
        Sample(s.path, s.label, s.mask_path, f"incoming/{s.origin}")
        for s in scan_dataset(incoming, good_class)
    ]


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
