import json

import cv2
import numpy as np
import pytest

from defectflow.data.mvtec import (
    DatasetError,
    class_counts,
    class_names,
    scan_dataset,
    scan_training_data,
)


def _write(path, value=100, shape=(8, 8, 3)):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full(shape, value, np.uint8))


def test_scan_pools_train_and_test_and_pairs_masks(tmp_path):
    _write(tmp_path / "train/good/000.png")
    _write(tmp_path / "test/good/000.png")
    _write(tmp_path / "test/crack/000.jpg")
    _write(tmp_path / "ground_truth/crack/000_mask.png", 255, (8, 8))
    _write(tmp_path / "test/poke/001.bmp")  # mask missing: kept, validation will flag it
    (tmp_path / "test/poke/notes.txt").write_text("ignored")
    samples = scan_dataset(tmp_path)
    assert class_counts(samples) == {"crack": 1, "good": 2, "poke": 1}
    assert class_names(samples) == ["good", "crack", "poke"]
    by_label = {s.label: s for s in samples if s.origin == "test"}
    assert by_label["crack"].mask_path.name == "000_mask.png"
    assert by_label["poke"].mask_path is None
    assert by_label["good"].mask_path is None


def test_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "missing")
    with pytest.raises(DatasetError, match="MVTec AD layout"):
        scan_dataset(tmp_path)
    (tmp_path / "test").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        scan_dataset(tmp_path)


def test_good_class_required(tmp_path):
    _write(tmp_path / "test/crack/000.png")
    with pytest.raises(DatasetError, match="good"):
        class_names(scan_dataset(tmp_path))


def test_reviewed_images_join_the_data_when_there_are_any(tmp_path):
    root, incoming = tmp_path / "data", tmp_path / "incoming"
    _write(root / "train/good/000.png")
    _write(root / "test/crack/000.png")
    _write(root / "ground_truth/crack/000_mask.png", 255, (8, 8))
    assert scan_training_data(root, incoming=None) == scan_dataset(root)
    assert scan_training_data(root, incoming=incoming) == scan_dataset(root)  # no folder yet
    incoming.mkdir()
    (incoming / "provenance.jsonl").write_text("{}\n")
    assert scan_training_data(root, incoming=incoming) == scan_dataset(root)  # nothing reviewed yet

    _write(incoming / "test/crack/000.png", 50)  # the same file name as in data.root
    _write(incoming / "ground_truth/crack/000_mask.png", 255, (8, 8))
    _write(incoming / "train/good/007.png", 60)
    _write(incoming / "train/good/008.png", 70)  # copied in by hand: no provenance line
    with (incoming / "provenance.jsonl").open("a") as log:  # what the inbox writes on review
        for image in ("test/crack/000.png", "train/good/007.png"):
            log.write(json.dumps({"image": image, "label": "x", "reviewer": "Ann"}) + "\n")
    merged = scan_training_data(root, incoming=incoming)
    assert class_counts(merged) == {"crack": 2, "good": 2}
    reviewed = {
        (s.origin, s.label, s.path.name) for s in merged if s.origin.startswith("incoming/")
    }
    assert reviewed == {
        ("incoming/test", "crack", "000.png"),
        ("incoming/train", "good", "007.png"),
    }
    assert all(s.mask_path for s in merged if s.label == "crack")

    with pytest.raises(DatasetError, match="folder of their own"):
        scan_training_data(root, incoming=root)
