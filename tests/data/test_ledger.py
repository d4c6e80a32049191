"""The split ledger: no file ever changes split as data comes and goes; the test split is
curated only; each class keeps its proportions."""

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from defectflow.data.ledger import (
    SPLITS,
    assign,
    golden_test_set,
    is_curated,
    read_ledger,
    write_ledger,
)
from defectflow.data.mvtec import DatasetError, Sample
from defectflow.data.split import SplitSample, split_dataset

SPLIT = SimpleNamespace(train=0.7, val=0.15, test=0.15, seed=42)
CLASSES = ("good", "crack", "poke", "scratch")


def _sample(label: str, i: int, reviewed: bool = False) -> tuple[Sample, str]:
    origin = ("incoming/" if reviewed else "") + ("train" if label == "good" else "test")
    path = Path(f"/data/{origin}/{label}/{i:04d}.png")
    return Sample(path, label, None, origin), f"{label}-{i}-{'r' if reviewed else 'c'}"


class Dataset:
    """Samples and their content hashes, grown and shrunk at random."""

    def __init__(self, rng):
        self.rng, self.items, self.next = rng, {}, 0

    def add(self, count: int, reviewed_share: float = 0.0):
        for _ in range(count):
            label = CLASSES[self.rng.integers(len(CLASSES))]
            sample, digest = _sample(label, self.next, bool(self.rng.random() < reviewed_share))
            self.items[sample.path] = (sample, digest)
            self.next += 1

    def remove(self, count: int):
        for path in self.rng.permutation(sorted(self.items))[:count]:
            del self.items[Path(path)]

    @property
    def samples(self):
        return [s for s, _ in self.items.values()]

    @property
    def sha256(self):
        return {s.path: d for s, d in self.items.values()}


def _seed_dataset(rng) -> Dataset:
    data = Dataset(rng)
    for label in CLASSES:  # every class splittable from the start
        for _ in range(8):
            sample, digest = _sample(label, data.next)
            data.items[sample.path] = (sample, digest)
            data.next += 1
    return data


@pytest.mark.parametrize("seed", range(8))
def test_no_file_ever_changes_split_over_random_additions_and_removals(seed):
    rng = np.random.default_rng(seed)
    data = _seed_dataset(rng)
    ledger, first_split = {}, {}
    for night in range(12):
        if night:
            data.add(int(rng.choice([1, 10, 100])), reviewed_share=0.3)
            data.remove(int(rng.integers(0, 6)))
        splits, ledger, changes = assign(data.samples, data.sha256, SPLIT, ledger, f"v{night}")
        for sample, digest in data.items.values():
            assert first_split.setdefault(digest, splits[sample.path]) == splits[sample.path]
            if not is_curated(sample):
                assert splits[sample.path] != "test", "a reviewed image entered the test split"
        assert changes.kept + changes.new_total == len(data.items)


def test_each_class_keeps_its_proportions_as_it_grows():
    rng = np.random.default_rng(0)
    data = _seed_dataset(rng)
    ledger = {}
    for night in range(5):
        data.add(100)
        splits, ledger, _ = assign(data.samples, data.sha256, SPLIT, ledger, f"v{night}")
    for label in CLASSES:
        counts = Counter(splits[s.path] for s in data.samples if s.label == label)
        n = sum(counts.values())
        assert all(counts[s] for s in SPLITS)
        assert abs(counts["test"] / n - 0.15) < 0.05 and abs(counts["val"] / n - 0.15) < 0.05


def test_the_same_files_get_the_same_splits_whatever_their_order():
    data = _seed_dataset(np.random.default_rng(1))
    data.add(40)
    samples = data.samples
    a, _, _ = assign(samples, data.sha256, SPLIT, {}, "v")
    b, _, _ = assign(list(reversed(samples)), data.sha256, SPLIT, {}, "v")
    assert a == b
    other_seed, _, _ = assign(
        samples, data.sha256, SimpleNamespace(**{**SPLIT.__dict__, "seed": 7}), {}, "v"
    )
    assert other_seed != a


def test_a_removed_file_that_comes_back_keeps_its_split_and_changed_bytes_are_new():
    data = _seed_dataset(np.random.default_rng(2))
    splits, ledger, _ = assign(data.samples, data.sha256, SPLIT, {}, "v1")
    some_test = next(s for s in data.samples if splits[s.path] == "test")
    kept = data.items.pop(some_test.path)
    _, ledger, changes = assign(data.samples, data.sha256, SPLIT, ledger, "v2")
    assert changes.absent == 1
    data.items[some_test.path] = kept
    again, ledger, _ = assign(data.samples, data.sha256, SPLIT, ledger, "v3")
    assert again[some_test.path] == "test"
    data.items[some_test.path] = (some_test, "rewritten-bytes")
    _, _, changes = assign(data.samples, data.sha256, SPLIT, ledger, "v4")
    assert changes.changed == [
        (f"{some_test.origin}/{some_test.label}/{some_test.path.name}", "test")
    ]
    assert "changed (new bytes, assigned as new)" in changes.summary()


def test_a_new_class_needs_three_curated_images():
    data = _seed_dataset(np.random.default_rng(3))
    _, ledger, _ = assign(data.samples, data.sha256, SPLIT, {}, "v1")
    for i in range(5):  # a defect type that only ever came through review
        sample, digest = _sample("squeeze", 9000 + i, reviewed=True)
        data.items[sample.path] = (sample, digest)
    with pytest.raises(DatasetError, match="'squeeze' needs at least 3 curated images"):
        assign(data.samples, data.sha256, SPLIT, ledger, "v2")


def test_the_ledger_file_round_trips_and_split_dataset_uses_it(tmp_path):
    data = _seed_dataset(np.random.default_rng(4))
    first = split_dataset(data.samples, data.sha256, SPLIT, tmp_path)
    assert first.test_set.size == sum(r.split == "test" for r in first.rows)
    (ledger_file,) = tmp_path.glob("ledger-*.csv")
    entries = read_ledger(ledger_file)
    write_ledger(tmp_path / "copy.csv", entries)
    assert read_ledger(tmp_path / "copy.csv") == entries
    data.add(30, reviewed_share=0.5)
    second = split_dataset(data.samples, data.sha256, SPLIT, tmp_path)
    before = {r.sample.path: r.split for r in first.rows}
    assert all(before[r.sample.path] == r.split for r in second.rows if r.sample.path in before)
    assert second.changes.new_total == 30 and second.changes.kept == len(first.rows)
    curated_new = [r for r in second.rows if r.sample.path not in before and is_curated(r.sample)]
    grew = any(r.split == "test" for r in curated_new)
    assert (second.test_set.version != first.test_set.version) == grew
    assert golden_test_set([SplitSample(s, "test") for s in []], {}).size == 0


def test_the_guard_leaves_out_test_files_a_model_trained_on_and_names_them(tmp_path):
    from defectflow.data.ledger import guard_test_set

    data = _seed_dataset(np.random.default_rng(5))
    outcome = split_dataset(data.samples, data.sha256, SPLIT, tmp_path)
    sha = data.sha256
    test_rows = [r for r in outcome.rows if r.split == "test"]
    own = {sha[r.sample.path]: r.split for r in outcome.rows}
    clean = guard_test_set(outcome.rows, sha, {"challenger": own})
    assert not clean.leaked and clean.test_set == outcome.test_set
    # A champion trained on another split: two of today's test files were in its training data.
    champion = {sha[r.sample.path]: "train" for r in test_rows[:2]}
    guarded = guard_test_set(
        outcome.rows, sha, {"challenger": own, "champion X": champion, "old": None}
    )
    names = sorted(f"{r.sample.label}/{r.sample.path.name}" for r in test_rows[:2])
    assert guarded.leaked == {"champion X": names} and guarded.unknown == ["old"]
    assert guarded.test_set.size == outcome.test_set.size - 2
    assert sum(r.split == "excluded" for r in guarded.rows) == 2
    assert "2 left out: champion X trained or validated on them" in guarded.note
    assert "old's training split is unknown" in guarded.note


def test_the_guard_refuses_a_comparison_with_no_test_image_left(tmp_path):
    from defectflow.data.ledger import guard_test_set

    data = _seed_dataset(np.random.default_rng(6))
    outcome = split_dataset(data.samples, data.sha256, SPLIT, tmp_path)
    sha = data.sha256
    # A champion trained on another split that happened to hold every one of today's test files.
    champion = {sha[r.sample.path]: "train" for r in outcome.rows if r.split == "test"}
    with pytest.raises(ValueError, match="no test image is left to compare on: champion X"):
        guard_test_set(outcome.rows, sha, {"champion X": champion})
