from collections import Counter
from pathlib import Path

import pytest

from defectflow.data.mvtec import DatasetError, Sample
from defectflow.data.split import read_manifest, select, stratified_split, write_manifest


def _samples(counts):
    return [
        Sample(
            Path(f"/d/{label}/{i:03d}.png"),
            label,
            None if label == "good" else Path(f"/m/{label}/{i}.png"),
            "test",
        )
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


def _sha(samples):
    return {s.path: f"hash-{s.label}-{s.path.name}" for s in samples}


def test_fingerprint_and_manifest_reuse(tmp_path):
    from omegaconf import OmegaConf

    from defectflow.data.split import data_fingerprint, split_dataset, split_with_manifest

    split_cfg = OmegaConf.create({"train": 0.6, "val": 0.2, "test": 0.2, "seed": 3})
    samples = _samples({"good": 10, "crack": 5})
    sha = _sha(samples)
    rows, fingerprint, reused, *_ = split_with_manifest(samples, sha, split_cfg, tmp_path)
    assert not reused and (tmp_path / f"{fingerprint}.csv").exists()
    again, same, reused, *_ = split_with_manifest(samples, sha, split_cfg, tmp_path)
    assert reused and same == fingerprint and again == rows
    # Same data in another folder: same version. Changed content or split settings: a new one.
    moved = [
        Sample(Path("/elsewhere") / s.path.relative_to("/d"), s.label, s.mask_path, s.origin)
        for s in samples
    ]
    assert (
        data_fingerprint(
            moved, {m.path: sha[s.path] for m, s in zip(moved, samples, strict=True)}, split_cfg
        )
        == fingerprint
    )
    changed = {**sha, samples[0].path: "other"}
    assert data_fingerprint(samples, changed, split_cfg) != fingerprint
    assert data_fingerprint(samples, sha, OmegaConf.create({**split_cfg, "seed": 4})) != fingerprint
    # Unreadable files or too few images: no split, and the reason.
    assert "unreadable" in split_dataset(samples, {}, split_cfg, tmp_path).problem
    few = _samples({"good": 5, "crack": 2})
    fresh = tmp_path / "fresh"  # a ledger that has seen these files would keep their splits
    assert (
        "needs at least 3 curated images" in split_dataset(few, _sha(few), split_cfg, fresh).problem
    )


def test_manifest_records_content_hashes(tmp_path):
    import csv

    samples = _samples({"good": 4, "crack": 4})
    rows = stratified_split(samples, 0.5, 0.25, 0.25, 0)
    path = write_manifest(rows, tmp_path / "manifest.csv", _sha(samples))
    with path.open() as fh:
        records = list(csv.DictReader(fh))
    assert {r["sha256"] for r in records} == set(_sha(samples).values())
    assert not (tmp_path / "manifest.tmp").exists()
