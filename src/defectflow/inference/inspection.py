"""Inspecting files and folders offline: `defectflow predict PATH...`.

Every file named, found in a folder (recursively) or matched by a glob is one row of the
report, in a stable order: readable images get the model's answer (through `Predictor`, the
serving path, in batches), anything else its error. With an output folder, each image's mask
and overlay PNGs are written there under the input's path below the inputs' common parent
folder (see `collect_inputs`), so two inputs never share an output. Rows are written and
flushed as they are produced, so a run stopped with Ctrl-C leaves a valid report of what it did.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import queue
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from defectflow.inference.postprocessing import overlay
from defectflow.inference.preprocessing import InvalidImageError, decode_image

#: What the report says of a file that could not be inspected, in the `class` column.
ERROR_CLASS = "error"
FORMATS = ("csv", "json")


@dataclass(frozen=True)
class InputFile:
    path: Path
    #: Its path below the common parent folder of all the inputs (the input tree, mirrored).
    relative: Path
    #: Its mask and overlay are <output folder>/<output_stem>_mask.png and _overlay.png:
    #: `relative` without its suffix, or with it when that would clash (a/x.png, a/x.jpg).
    output_stem: Path


@dataclass
class InputList:
    files: list[InputFile]
    #: Arguments that named nothing (no such file, or a glob that matched nothing).
    missing: list[str] = field(default_factory=list)


def _is_glob(argument: str) -> bool:
    return any(char in argument for char in "*?[")


def collect_inputs(arguments: Iterable[str]) -> InputList:
    """The files behind `arguments`: files as given, folders walked recursively (hidden
    files and folders skipped), globs expanded (`**` recursive). A file reached twice is
    listed once.

    Output paths mirror the inputs below their common parent folder: the deepest folder
    holding every file and folder named or matched (symlinks not followed, `..` collapsed).
    `a/001.png` alone gives `001.png`; the folder `line3` gives `line3/...`; `a/001.png` and
    `b/001.png` (two arguments, or one glob `*/001.png`) give `a/001.png` and `b/001.png`, so
    no two inputs ever share an output. Masks and overlays drop the image suffix
    (`a/001_mask.png`) unless two inputs of a folder differ only by it (`a/001.png`,
    `a/001.jpg`): those keep it (`a/001.png_mask.png`, `a/001.jpg_mask.png`).
    """
    reached: dict[Path, tuple[Path, Path]] = {}  # resolved -> (path as given, absolute path)
    named: list[Path] = []  # the files and folders named or matched, absolute
    missing = []

    def add(path: Path, absolute: Path) -> None:
        reached.setdefault(path.resolve(), (path, absolute))

    for argument in arguments:
        matches = sorted(glob.glob(argument, recursive=True)) if _is_glob(argument) else [argument]
        if not matches or not all(Path(m).exists() for m in matches):
            missing.append(argument)
            continue
        for match in map(Path, matches):
            absolute = Path(os.path.abspath(match))
            named.append(absolute)
            if match.is_dir():
                for path in sorted(p for p in match.rglob("*") if p.is_file()):
                    relative = path.relative_to(match)
                    if not any(part.startswith(".") for part in relative.parts):
                        add(path, absolute / relative)
            else:
                add(match, absolute)
    if not reached:
        return InputList([], missing)
    base = Path(os.path.commonpath([path.parent for path in named]))
    relatives = [absolute.relative_to(base) for _, absolute in reached.values()]
    files = [
        InputFile(path, relative, stem)
        for (path, _), relative, stem in zip(
            reached.values(), relatives, _output_stems(relatives), strict=True
        )
    ]
    return InputList(files, missing)


def _output_stems(relatives: list[Path]) -> list[Path]:
    """Each (distinct) relative path without its suffix, or with it where the stems would clash."""
    stems = [relative.with_suffix("") for relative in relatives]
    while True:
        counts = Counter(stems)
        # Relative paths are distinct, so in a clash at most one stem is already the full path:
        # each round frees at least one, and a stem changed may clash anew with another's.
        clashing = [i for i, stem in enumerate(stems) if counts[stem] > 1 and stem != relatives[i]]
        if not clashing:
            return stems
        for i in clashing:
            stems[i] = relatives[i]


@dataclass
class InspectionRow:
    path: str
    label: str
    error: str = ""
    confidence: float | None = None
    status: str = ""
    is_defective: bool | None = None
    defect_area_fraction: float | None = None
    anomaly_score: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    mask: str = ""
    overlay: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "class": self.label,
            "confidence": self.confidence,
            "status": self.status,
            "is_defective": self.is_defective,
            "defect_area_fraction": self.defect_area_fraction,
            "anomaly_score": self.anomaly_score,
            "probabilities": self.probabilities,
            "mask": self.mask,
            "overlay": self.overlay,
            "error": self.error,
        }


def _write_png(path: Path, rgb_or_gray: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = cv2.cvtColor(rgb_or_gray, cv2.COLOR_RGB2BGR) if rgb_or_gray.ndim == 3 else rgb_or_gray
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")
    return str(path)


def inspect_files(
    predictor,
    files: list[InputFile],
    out_dir: Path | None = None,
    batch_size: int = 8,
    with_overlay: bool = True,
) -> Iterator[InspectionRow]:
    """One row per file, in order: the prediction, or why there is none. Images are read and
    predicted `batch_size` at a time; with `out_dir`, the mask (0/255) and, `with_overlay`,
    the overlay PNGs are written there as <output_stem>_mask.png and _overlay.png: the input's
    path below the inputs' common parent folder, so distinct inputs never share an output
    (see `collect_inputs`)."""
    contents = read_in_background([item.path for item in files], ahead=2 * batch_size)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images: list[np.ndarray | None] = []
        errors: list[str] = []
        for _ in chunk:
            try:
                data = next(contents)
                if isinstance(data, OSError):
                    raise data
                images.append(decode_image(data))
                errors.append("")
            except (InvalidImageError, OSError) as exc:
                images.append(None)
                errors.append(f"{type(exc).__name__}: {exc}")
        readable = [image for image in images if image is not None]
        predictions = iter(predictor.predict_arrays(readable, batch_size))
        for item, image, error in zip(chunk, images, errors, strict=True):
            if image is None:
                yield InspectionRow(str(item.path), ERROR_CLASS, error=error)
                continue
            prediction = next(predictions)
            row = InspectionRow(
                str(item.path),
                prediction.label,
                confidence=round(float(prediction.confidence), 6),
                status=prediction.status,
                is_defective=prediction.is_defective,
                defect_area_fraction=round(prediction.defect_area_fraction, 6),
                anomaly_score=None
                if prediction.anomaly_score is None
                else round(prediction.anomaly_score, 4),
                probabilities={c: round(p, 6) for c, p in prediction.probabilities.items()},
            )
            if out_dir is not None:
                stem = out_dir / item.output_stem
                row.mask = _write_png(
                    stem.with_name(stem.name + "_mask.png"), prediction.mask * 255
                )
                if with_overlay:
                    row.overlay = _write_png(
                        stem.with_name(stem.name + "_overlay.png"),
                        overlay(image, prediction.mask, (255, 0, 0), 0.5),
                    )
            yield row


def read_in_background(
    paths: list[Path], ahead: int = 16, poll_seconds: float = 0.2
) -> Iterator[bytes | OSError]:
    """Each file's bytes (or the OSError reading it raised), in order, read by a daemon thread
    at most `ahead` files ahead. The caller waits in short steps, so Ctrl-C stops the run even
    while a read blocks (a stalled network share, a pipe nobody writes to): the signal may
    reach any of the process's threads (TensorFlow starts many), and a main thread blocked in
    the read itself would never see it."""
    results: queue.Queue = queue.Queue(maxsize=max(1, ahead))
    stop = (
        threading.Event()
    )  # set when the caller is done: the reader ends instead of waiting to put

    def read_all() -> None:
        for path in paths:
            try:
                data: bytes | OSError = path.read_bytes()
            except OSError as exc:
                data = exc
            while not stop.is_set():
                try:
                    results.put(data, timeout=poll_seconds)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return

    threading.Thread(target=read_all, name="defectflow-read", daemon=True).start()
    try:
        for _ in paths:
            while True:
                try:
                    yield results.get(timeout=poll_seconds)
                    break
                except queue.Empty:
                    continue
    finally:
        stop.set()


class ReportWriter:
    """report.csv (one column per class probability) or report.jsonl, written row by row and
    flushed, so the file is valid whenever the run stops."""

    def __init__(self, path: Path, classes: list[str], format: str = "csv"):
        if format not in FORMATS:
            raise ValueError(f"unknown report format {format!r}: expected csv or json")
        self.path, self.classes, self.format = path, classes, format
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if format == "csv":
            self._csv = csv.writer(self._file)
            self._csv.writerow(
                [
                    "path",
                    "class",
                    "confidence",
                    "status",
                    "is_defective",
                    "defect_area_fraction",
                    "anomaly_score",
                    *[f"p_{c}" for c in classes],
                    "mask",
                    "overlay",
                    "error",
                ]
            )
            self._file.flush()

    def write(self, row: InspectionRow) -> None:
        if self.format == "json":
            self._file.write(json.dumps(row.to_dict()) + "\n")
        else:

            def cell(value):
                return "" if value is None else value

            self._csv.writerow(
                [
                    row.path,
                    row.label,
                    cell(row.confidence),
                    row.status,
                    cell(row.is_defective),
                    cell(row.defect_area_fraction),
                    cell(row.anomaly_score),
                    *[cell(row.probabilities.get(c)) for c in self.classes],
                    row.mask,
                    row.overlay,
                    row.error,
                ]
            )
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def summarize(rows: list[InspectionRow], total: int, seconds: float) -> dict:
    """Counts per class, the defective share of the images inspected, the files that could not
    be, and the throughput."""
    inspected = [r for r in rows if r.ok]
    return {
        "files": total,
        "done": len(rows),
        "inspected": len(inspected),
        "unreadable": [{"path": r.path, "error": r.error} for r in rows if not r.ok],
        "classes": dict(sorted(Counter(r.label for r in inspected).items())),
        "defective": sum(bool(r.is_defective) for r in inspected),
        "defective_fraction": (sum(bool(r.is_defective) for r in inspected) / len(inspected))
        if inspected
        else float("nan"),
        "uncertain": sum(r.status == "uncertain" for r in inspected),
        "seconds": round(seconds, 2),
        "images_per_second": round(len(inspected) / seconds, 2) if seconds else None,
        "interrupted": len(rows) < total,
    }
