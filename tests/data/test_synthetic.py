"""Tests for the synthetic MVTec-layout capsule dataset."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from defectflow.data.synthetic import (
    CLASSES,
    DEFECT_TYPES,
    _render,
    generate_dataset,
    render_sample,
)

SIZE = 64
SMALL = {"image_size": SIZE, "n_train_good": 3, "n_test_good": 2, "n_per_defect": 2}


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synth") / "capsule", seed=3, **SMALL)


def test_public_names() -> None:
    assert DEFECT_TYPES == ("crack", "faulty_imprint", "poke", "scratch", "squeeze")
    assert CLASSES == ("good",) + DEFECT_TYPES


def test_layout_and_counts(dataset: Path) -> None:
    assert isinstance(dataset, Path)
    assert sorted(p.name for p in dataset.iterdir()) == [
        "ground_truth",
        "license.txt",
        "test",
        "train",
    ]
    assert [p.name for p in sorted((dataset / "train" / "good").iterdir())] == [
        "000.png",
        "001.png",
        "002.png",
    ]
    assert sorted(p.name for p in (dataset / "test").iterdir()) == sorted(CLASSES)
    assert len(list((dataset / "test" / "good").glob("*.png"))) == 2
    assert sorted(p.name for p in (dataset / "ground_truth").iterdir()) == sorted(DEFECT_TYPES)
    for defect in DEFECT_TYPES:
        images = sorted((dataset / "test" / defect).glob("*.png"))
        masks = sorted((dataset / "ground_truth" / defect).glob("*.png"))
        assert [p.stem for p in images] == ["000", "001"]
        assert [p.stem for p in masks] == ["000_mask", "001_mask"]
    assert "synthetic" in (dataset / "license.txt").read_text().lower()


def test_images_and_masks_on_disk(dataset: Path) -> None:
    for image_path in dataset.rglob("*.png"):
        if image_path.parent.parent.name == "ground_truth":
            continue
        image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        label = image_path.parent.name
        mask_path = dataset / "ground_truth" / label / f"{image_path.stem}_mask.png"
        if label == "good":
            assert not mask_path.exists()
            continue
        mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
        assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) == {0, 255}


def test_no_ground_truth_for_good(dataset: Path) -> None:
    assert not (dataset / "ground_truth" / "good").exists()


def test_readable_by_mvtec_scanner(dataset: Path) -> None:
    from defectflow.data.mvtec import scan_dataset

    samples = scan_dataset(dataset)
    assert len(samples) == 3 + 2 + 2 * len(DEFECT_TYPES)
    for s in samples:
        assert (s.mask_path is None) == (s.label == "good")


def test_render_sample_good_has_empty_mask() -> None:
    image, mask = render_sample(np.random.default_rng(0), 96, None)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    assert mask.shape == (96, 96) and mask.dtype == np.uint8
    assert not mask.any()


@pytest.mark.parametrize("defect", DEFECT_TYPES)
@pytest.mark.parametrize("size", [64, 128])
def test_defect_masks_small_binary_and_on_capsule(defect: str, size: int) -> None:
    capsule_px = []
    for i in range(25):
        image, mask, capsule = _render(np.random.default_rng([size, i]), size, defect)
        assert mask.shape == image.shape[:2] == (size, size)
        assert set(np.unique(mask).tolist()) == {0, 255}
        fraction = np.count_nonzero(mask) / mask.size
        assert 0.001 <= fraction <= 0.05, (defect, i, fraction)
        on = mask > 0
        if defect == "squeeze":
            # The deformed outline may leave the normal capsule, but only next to it.
            near = cv2.dilate(capsule.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
            assert not (on & ~near).any()
        else:
            assert not (on & ~capsule).any()
        capsule_px.append(np.count_nonzero(capsule))
    # The capsule is the dominant object: roughly a fifth of the frame.
    assert 0.1 < np.mean(capsule_px) / size**2 < 0.35


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_defect_is_visible(defect: str) -> None:
    """The same seeded scene with and without the defect differs clearly inside the mask.

    Lighting and noise are drawn after the defect, so the two renders also differ a little
    everywhere; the defect must stand well above that.
    """
    for i in range(8):
        good, _ = render_sample(np.random.default_rng([9, i]), 128, None)
        bad, mask = render_sample(np.random.default_rng([9, i]), 128, defect)
        diff = np.abs(bad.astype(int) - good.astype(int)).sum(axis=2)
        on = mask > 0
        inside, outside = diff[on].mean(), diff[~on].mean()
        assert inside > 50 and inside > 1.5 * outside, (defect, i, inside, outside)


def test_render_sample_rejects_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="defect"):
        render_sample(rng, 64, "dent")
    with pytest.raises(ValueError, match="image_size"):
        render_sample(rng, 16, None)


def test_deterministic(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", seed=5, **SMALL)
    b = generate_dataset(tmp_path / "b", seed=5, **SMALL)
    digests_a = _digests(a)
    assert digests_a == _digests(b)
    assert len(digests_a) == 3 + 2 + 2 * 2 * len(DEFECT_TYPES) + 1


def test_counts_do_not_reshuffle_other_images(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", seed=5, **SMALL)
    b = generate_dataset(tmp_path / "b", seed=5, **{**SMALL, "n_train_good": 5})
    da, db = _digests(a), _digests(b)
    shared = set(da) - {"license.txt"}
    assert all(da[k] == db[k] for k in shared)


def test_different_seeds_differ(tmp_path: Path) -> None:
    a = _digests(generate_dataset(tmp_path / "a", seed=1, **SMALL))
    b = _digests(generate_dataset(tmp_path / "b", seed=2, **SMALL))
    images = [k for k in a if k.endswith(".png")]
    assert all(a[k] != b[k] for k in images)


def test_existing_non_empty_root_needs_overwrite(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "d", seed=1, **SMALL)
    (root / "notes.md").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate_dataset(root, seed=2, **SMALL)

    # overwrite replaces only what the generator owns: stale images go, other files stay.
    (root / "test" / "crack" / "999.png").write_bytes(b"stale")
    generate_dataset(root, seed=2, overwrite=True, **{**SMALL, "n_per_defect": 1})
    assert (root / "notes.md").read_text() == "keep me"
    assert not (root / "test" / "crack" / "999.png").exists()
    assert [p.name for p in (root / "test" / "crack").iterdir()] == ["000.png"]
    fresh = _digests(generate_dataset(tmp_path / "fresh", seed=2, **{**SMALL, "n_per_defect": 1}))
    rewritten = _digests(root)
    rewritten.pop("notes.md")
    assert rewritten == fresh


def test_empty_existing_root_is_fine(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    assert generate_dataset(str(root), **SMALL) == root


def test_root_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(FileExistsError):
        generate_dataset(path, overwrite=True, **SMALL)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 31}, "image_size"),
        ({"image_size": 64.0}, "image_size"),
        ({"n_train_good": -1}, "n_train_good"),
        ({"n_test_good": -1}, "n_test_good"),
        ({"n_per_defect": 0}, "n_per_defect"),
        ({"seed": -1}, "seed"),
        ({"n_train_good": 0, "n_test_good": 0}, "good"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate_dataset(tmp_path / "d", **{**SMALL, **kwargs})
    assert not (tmp_path / "d").exists()  # validated before touching the disk
