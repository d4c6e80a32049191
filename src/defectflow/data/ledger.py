"""The split ledger: every file keeps its split for life, however the data grows.

A stratified split drawn again over a grown dataset reshuffles every class a new file joins:
images the production model trained on move into the new test split, and the gate then grades
that model partly on its own training images. The ledger prevents it. It records, for one set
of split settings (fractions and seed), the split of every file it has seen, by content hash
(`<manifest_dir>/ledger-<settings>.csv`):

- a file in the ledger keeps its split, also when it was removed and comes back, or moved to
  another folder;
- new files of a class are assigned in a deterministic order (a hash of the seed and the
  content), each to the split furthest below the configured fractions, so every class keeps
  its proportions; a class the ledger has never seen is split like a fresh dataset (every
  class in every split);
- the test split is the golden set: it only takes curated files (the dataset root), never
  reviewed images from the inbox (`origin` "incoming/..."), which go to train and val;
- a file whose bytes changed under the same name is a new file (its old content keeps its
  entry), and the change is reported.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from defectflow.data.mvtec import DatasetError, Sample
from defectflow.files import atomic_write

SPLITS = ("train", "val", "test")
LEDGER_FIELDS = ("sha256", "split", "label", "origin", "name", "first_seen")
#: Files from the review inbox carry this origin prefix (`scan_training_data`).
REVIEWED_PREFIX = "incoming/"


def is_curated(sample: Sample) -> bool:
    """From the dataset root, not from the review inbox: only these may enter the test split."""
    return not sample.origin.startswith(REVIEWED_PREFIX)


def settings_key(split_cfg) -> str:
    """Which ledger: one per split fractions and seed (another seed is another split)."""
    text = f"{split_cfg.train}/{split_cfg.val}/{split_cfg.test}/{split_cfg.seed}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def ledger_path(manifest_dir: Path, split_cfg) -> Path:
    return Path(manifest_dir) / f"ledger-{settings_key(split_cfg)}.csv"


@dataclass(frozen=True)
class LedgerEntry:
    sha256: str
    split: str
    label: str
    origin: str
    name: str
    #: The data version in which the file was first assigned.
    first_seen: str


def read_ledger(path: Path) -> dict[str, LedgerEntry]:
    if not Path(path).exists():
        return {}
    with Path(path).open(newline="") as fh:
        entries = [LedgerEntry(**{k: row[k] for k in LEDGER_FIELDS}) for row in csv.DictReader(fh)]
    return {e.sha256: e for e in entries}


def write_ledger(path: Path, entries: dict[str, LedgerEntry]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=LEDGER_FIELDS)
    writer.writeheader()
    for entry in sorted(entries.values(), key=lambda e: (e.first_seen, e.label, e.name, e.sha256)):
        writer.writerow(entry.__dict__)
    atomic_write(path, text.getvalue().encode())


@contextmanager
def locked(path: Path):
    """One writer of a ledger at a time (two runs starting together must agree)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@dataclass
class SplitChanges:
    """What a data version changed in the split, for the people reading the summary."""

    kept: int = 0
    #: class -> split -> number of new files assigned there.
    new: dict[str, Counter] = field(default_factory=dict)
    #: Files whose name was in the ledger with other bytes: (origin/label/name, old split).
    changed: list[tuple[str, str]] = field(default_factory=list)
    #: Ledger files absent from this data version (they keep their entry and split).
    absent: int = 0

    @property
    def new_total(self) -> int:
        return sum(sum(c.values()) for c in self.new.values())

    def summary(self) -> str:
        lines = [
            f"split: {self.kept} images kept their split, {self.new_total} new, "
            f"{len(self.changed)} changed, {self.absent} no longer present"
        ]
        for label in sorted(self.new):
            where = ", ".join(f"{n} to {s}" for s in SPLITS if (n := self.new[label][s]))
            lines.append(f"  new {label}: {where}")
        lines += [
            f"  changed (new bytes, assigned as new): {name} (was {old})"
            for name, old in self.changed
        ]
        return "\n".join(lines)


def _order_key(seed: int, sha256: str) -> str:
    return hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()


def _fresh_class(members: list[Sample], split_cfg) -> dict[Path, str]:
    """A class the ledger has not seen: its curated files split like a fresh dataset (each split
    gets at least one), its reviewed files to train and val."""
    curated = [s for s in members if is_curated(s)]
    n = len(curated)
    if n < 3:
        raise DatasetError(
            f"class {members[0].label!r} needs at least 3 curated images to split 3 ways, has {n}"
        )
    n_test = max(1, round(n * split_cfg.test))
    n_val = min(max(1, round(n * split_cfg.val)), n - n_test - 1)
    out = {s.path: "test" for s in curated[:n_test]}
    out |= {s.path: "val" for s in curated[n_test : n_test + n_val]}
    out |= {s.path: "train" for s in curated[n_test + n_val :]}
    return out


def _deficit_split(counts: Counter, split_cfg, allowed: tuple[str, ...]) -> str:
    """The allowed split furthest below its share once one more file is added."""
    total = sum(counts.values()) + 1
    fractions = {"train": split_cfg.train, "val": split_cfg.val, "test": split_cfg.test}
    return max(allowed, key=lambda s: (fractions[s] * total - counts[s], -SPLITS.index(s)))


def assign(
    samples: list[Sample],
    sha256: dict[Path, str],
    split_cfg,
    ledger: dict[str, LedgerEntry],
    version: str,
) -> tuple[dict[Path, str], dict[str, LedgerEntry], SplitChanges]:
    """Each sample's split under `ledger`: (path -> split, the updated ledger, the changes)."""
    changes = SplitChanges()
    updated = dict(ledger)
    by_name = {(e.origin, e.label, e.name): e for e in ledger.values()}
    present = {sha256[s.path] for s in samples}
    changes.absent = sum(h not in present for h in ledger)
    splits: dict[Path, str] = {}
    new_by_class: dict[str, list[Sample]] = {}
    for s in samples:
        entry = ledger.get(sha256[s.path])
        if entry is not None:
            splits[s.path] = entry.split
            changes.kept += 1
            continue
        old = by_name.get((s.origin, s.label, s.path.name))
        if old is not None and old.sha256 in ledger and old.sha256 not in present:
            changes.changed.append((f"{s.origin}/{s.label}/{s.path.name}", old.split))
        new_by_class.setdefault(s.label, []).append(s)
    seed = int(split_cfg.seed)
    for label, members in sorted(new_by_class.items()):
        members.sort(key=lambda s: _order_key(seed, sha256[s.path]))
        counts = Counter(splits[s.path] for s in samples if s.label == label and s.path in splits)
        if not counts:  # a class the ledger has not seen
            assigned = _fresh_class(members, split_cfg)
            counts = Counter(assigned.values())
            members = [s for s in members if s.path not in assigned]
        else:
            assigned = {}
        for s in members:  # in the class's stable order
            allowed = SPLITS if is_curated(s) else ("train", "val")
            split = _deficit_split(counts, split_cfg, allowed)
            assigned[s.path] = split
            counts[split] += 1
        changes.new[label] = Counter(assigned.values())
        for s in (m for m in new_by_class[label]):
            splits[s.path] = assigned[s.path]
            updated[sha256[s.path]] = LedgerEntry(
                sha256[s.path], assigned[s.path], s.label, s.origin, s.path.name, version
            )
    return splits, updated, changes


@dataclass(frozen=True)
class GoldenSet:
    """The golden test split of a data version: what the gate compares on."""

    #: A hash of the test files' contents: equal versions, equal test sets.
    version: str
    size: int

    def to_dict(self) -> dict:
        return {"version": self.version, "size": self.size}


def golden_test_set(rows, sha256: dict[Path, str]) -> GoldenSet:
    hashes = sorted(sha256[r.sample.path] for r in rows if r.split == "test")
    return GoldenSet(hashlib.sha256("\n".join(hashes).encode()).hexdigest()[:12], len(hashes))


@dataclass
class GuardedTestSet:
    """The test split the gate compares on, after the leakage check."""

    #: The split rows, test files seen in training moved to split "excluded".
    rows: list
    test_set: GoldenSet
    #: model -> names of this test split's files it trained or validated on.
    leaked: dict[str, list[str]] = field(default_factory=dict)
    #: Models whose training split is unknown (registered before manifests were kept).
    unknown: list[str] = field(default_factory=list)

    @property
    def note(self) -> str:
        parts = [f"test set {self.test_set.version} ({self.test_set.size} images)"]
        for model, names in self.leaked.items():
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            parts.append(f"{len(names)} left out: {model} trained or validated on them ({shown})")
        parts += [f"{model}'s training split is unknown (no manifest)" for model in self.unknown]
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {**self.test_set.to_dict(), "leaked": self.leaked, "unknown": self.unknown}


def guard_test_set(rows, sha256: dict[Path, str], trained_on: dict[str, dict[str, str] | None]):
    """The test rows no model in `trained_on` (model -> {sha256: split} of the split it was
    trained with; None: unknown) saw in training or validation. A file any of them saw is left
    out of the comparison for all (both models are graded on the same images), and named."""
    test = {sha256[r.sample.path]: r for r in rows if r.split == "test"}
    leaked: dict[str, list[str]] = {}
    for model, splits in trained_on.items():
        if splits is None:
            continue
        seen = sorted(
            f"{r.sample.label}/{r.sample.path.name}"
            for digest, r in test.items()
            if splits.get(digest) in ("train", "val")
        )
        if seen:
            leaked[model] = seen
    out_names = {name for names in leaked.values() for name in names}
    if test and len(out_names) >= len(test):
        raise ValueError(
            f"no test image is left to compare on: {', '.join(sorted(leaked))} trained or "
            "validated on all of them (a model trained on another split of these images, e.g. "
            "another data.split.seed). Train with the split that model used, or register under "
            "another package.model_name so it is not the champion"
        )
    guarded = [
        type(r)(r.sample, "excluded")
        if r.split == "test" and f"{r.sample.label}/{r.sample.path.name}" in out_names
        else r
        for r in rows
    ]
    return GuardedTestSet(
        guarded,
        golden_test_set(guarded, sha256),
        leaked,
        [model for model, splits in trained_on.items() if splits is None],
    )
