from collections import Counter
from pathlib import Path

import pytest

from defectflow.data.mvtec import DatasetError, Sample
from defectflow.data.split import read_manifest, select, stratified_split, write_manifest


def _samples(counts):
    return [
        Sample(Path(f"/d/{label}/{i:03d}.png"), label, None if label == "good" else Path(f"/m/{label}/{i}.png"), "test")
        for label, n in counts.items()
        for i in range(n)
    ]


def test_split_is_stratified_seeded_and_complete():
    samples = _samples({"good": 60, "crack": 20, "poke": 20})
    rows = stratified_split(samples, 0.7, 0.15, 0.15, seed=1)
    assert len(rows) == 100
    assert {r.sample for r in rows} == set(samples)
    counts = Counter((r.split, r.sample.label) for r in rows)
    assert counts[("train", "good")] == 42 and counts[("train", "crack")] == 14
    assert counts[("test", "crack")] + counts[("val", "crack")] == 6
    assert rows == stratified_split(samples, 0.7, 0.15, 0.15, seed=1)
    assert rows != stratified_split(samples, 0.7, 0.15, 0.15, seed=2)


def test_too_few_images_in_a_class():
    with pytest.raises(DatasetError, match="crack"):
        stratified_split(_samples({"good": 10, "crack": 2}), 0.7, 0.15, 0.15, 0)


def test_manifest_round_trip(tmp_path):
    rows = stratified_split(_samples({"good": 10, "crack": 10}), 0.6, 0.2, 0.2, 0)
    path = write_manifest(rows, tmp_path / "run" / "manifest.csv")
    assert read_manifest(path) == rows
    assert len(select(rows, "val")) == 4
