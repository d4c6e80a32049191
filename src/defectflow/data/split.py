"""Seeded, stratified train/val/test split of the pooled images, kept stable as the data grows
(`defectflow.data.ledger`), saved as a manifest."""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectflow.data.ledger import (
    SPLITS,
    GoldenSet,
    LedgerEntry,
    SplitChanges,
    assign,
    golden_test_set,
    ledger_path,
    locked,
    read_ledger,
    write_ledger,
)
from defectflow.data.mvtec import DatasetError, Sample, scan_training_data
from defectflow.files import atomic_write


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
        raise DatasetError(
            f"each class needs at least 3 images to split 3 ways; too few: {too_few}"
        )
    rng = np.random.default_rng(seed)
    out: list[SplitSample] = []
    for label in sorted(by_class):
        members = by_class[label]
        order = rng.permutation(len(members))
        n = len(members)
        n_test = max(1, round(n * test))
        n_val = max(1, round(n * val))
        n_val = min(n_val, n - n_test - 1)
        parts = (
            ("test", order[:n_test]),
            ("val", order[n_test : n_test + n_val]),
            ("train", order[n_test + n_val :]),
        )
        out += [SplitSample(members[i], name) for name, idx in parts for i in idx]
    return sorted(out, key=lambda x: (SPLITS.index(x.split), str(x.sample.path)))


MANIFEST_FIELDS = ("path", "label", "split", "sha256", "mask_path", "origin")


def data_fingerprint(samples: list[Sample], sha256: dict[Path, str], split_cfg) -> str:
    """The data version: a hash of every file's name, class and content, and of the split
    settings. Unchanged data gives the same fingerprint wherever the folder lives."""
    digest = hashlib.sha256()
    digest.update(f"{split_cfg.train}/{split_cfg.val}/{split_cfg.test}/{split_cfg.seed}\n".encode())
    for s in sorted(samples, key=lambda s: (s.label, s.origin, s.path.name)):
        digest.update(f"{s.origin}/{s.label}/{s.path.name}:{sha256[s.path]}\n".encode())
    return digest.hexdigest()


def dataset_fingerprint(
    root: str | Path, good_class: str, split_cfg, incoming: str | Path | None = None
) -> str:
    """`data_fingerprint` of the dataset at `root` (with the reviewed images of `incoming`),
    reading each file once (no decoding): what the nightly retrain compares with the production
    model's. Unreadable files are left out here; the validation gate reports them."""
    samples = scan_training_data(root, good_class, incoming)
    sha256 = {}
    for s in samples:
        try:
            sha256[s.path] = hashlib.sha256(s.path.read_bytes()).hexdigest()
        except OSError:
            continue
    return data_fingerprint([s for s in samples if s.path in sha256], sha256, split_cfg)


def listing_signature(root: str | Path) -> str:
    """A cheap key of a folder's state: every file's relative path, size and modification time.
    Equal signatures mean nothing was added, removed or rewritten (the content hash is then
    the same too), so the hash can be reused without reading the files again."""
    root = Path(root)
    digest = hashlib.sha256(str(root.resolve()).encode())
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def split_with_manifest(
    samples: list[Sample], sha256: dict[Path, str], split_cfg, manifest_dir: Path
) -> tuple[list[SplitSample], str, bool, SplitChanges, GoldenSet]:
    """The split of this data version under the split ledger (`defectflow.data.ledger`: a file
    keeps its split for life, new files keep each class's proportions, the test split takes
    curated files only), stored as `<manifest_dir>/<fingerprint>.csv`. Returns (rows,
    fingerprint, reused: this data version was split before, changes, test set)."""
    fingerprint = data_fingerprint(samples, sha256, split_cfg)
    stored = Path(manifest_dir) / f"{fingerprint}.csv"
    path = ledger_path(manifest_dir, split_cfg)
    with locked(path):
        ledger = read_ledger(path)
        if not ledger and stored.exists():  # a data version split before the ledger existed
            ledger = {
                r["sha256"]: LedgerEntry(
                    r["sha256"],
                    r["split"],
                    r["label"],
                    r["origin"],
                    Path(r["path"]).name,
                    fingerprint[:12],
                )
                for r in _manifest_records(stored)
                if r["sha256"]
            }
        splits, updated, changes = assign(samples, sha256, split_cfg, ledger, fingerprint[:12])
        if updated != ledger or not path.exists():
            write_ledger(path, updated)
    rows = sorted(
        (SplitSample(s, splits[s.path]) for s in samples),
        key=lambda x: (SPLITS.index(x.split), str(x.sample.path)),
    )
    reused = stored.exists()
    if not reused:
        write_manifest(rows, stored, sha256)
    return rows, fingerprint, reused, changes, golden_test_set(rows, sha256)


@dataclass
class SplitOutcome:
    rows: list[SplitSample]
    fingerprint: str
    reused: bool = False
    #: What this data version changed in the split (new files per class and split, ...).
    changes: SplitChanges | None = None
    #: The golden test split's version and size.
    test_set: GoldenSet | None = None
    #: Why there is no split (unreadable files, too few images); the validation gate then
    #: reports the same problem by file name.
    problem: str = ""


def split_dataset(
    samples: list[Sample], sha256: dict[Path, str], split_cfg, manifest_dir: Path
) -> SplitOutcome:
    """`split_with_manifest`, or the reason it cannot be done yet."""
    unreadable = [str(s.path) for s in samples if not sha256.get(s.path)]
    if unreadable:
        return SplitOutcome(
            [], "", problem=f"{len(unreadable)} unreadable files, e.g. {unreadable[0]}"
        )
    try:
        return SplitOutcome(*split_with_manifest(samples, sha256, split_cfg, manifest_dir))
    except DatasetError as exc:
        return SplitOutcome([], "", problem=str(exc))


def write_manifest(
    rows: list[SplitSample], path: Path, sha256: dict[Path, str] | None = None
) -> Path:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=MANIFEST_FIELDS)
    writer.writeheader()
    for r in rows:
        s = r.sample
        writer.writerow(
            {
                "path": str(s.path),
                "label": s.label,
                "split": r.split,
                "sha256": (sha256 or {}).get(s.path, ""),
                "mask_path": str(s.mask_path) if s.mask_path else "",
                "origin": s.origin,
            }
        )
    atomic_write(path, text.getvalue().encode())  # never a half-written manifest
    return path


def _manifest_records(path: Path) -> list[dict]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


def manifest_splits(path: Path) -> dict[str, str]:
    """{content sha256: split} of a manifest (what a model trained, validated and tested on)."""
    return {r["sha256"]: r["split"] for r in _manifest_records(path) if r["sha256"]}


def manifest_hashes(path: Path) -> dict[Path, str]:
    """{file path: content sha256} of a manifest."""
    return {Path(r["path"]): r["sha256"] for r in _manifest_records(path) if r["sha256"]}


def read_manifest(path: Path) -> list[SplitSample]:
    with path.open(newline="") as fh:
        return [
            SplitSample(
                Sample(
                    Path(r["path"]),
                    r["label"],
                    Path(r["mask_path"]) if r["mask_path"] else None,
                    r["origin"],
                ),
                r["split"],
            )
            for r in csv.DictReader(fh)
        ]


def select(rows: list[SplitSample], split: str) -> list[Sample]:
    return [r.sample for r in rows if r.split == split]
