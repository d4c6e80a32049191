"""The data validation stage: image facts + the Great Expectations suite in expectations/."""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from defectflow.config import ValidationConfig
from defectflow.data.mvtec import scan_dataset
from defectflow.data.split import stratified_split
from defectflow.data.validation import (
    FACT_COLUMNS,
    DataValidationError,
    _good_mask_path,
    image_facts,
    require_valid,
    split_map,
    validate_dataset,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

SIZE = 48
DEFECTS = {"crack": 3, "scratch": 3}


def _image(rng: np.random.Generator, size: int = SIZE, channels: int = 3, dtype=np.uint8):
    high = 65535 if dtype == np.uint16 else 255
    shape = (size, size) if channels == 1 else (size, size, channels)
    return rng.integers(0, high + 1, shape, dtype=dtype)


def _mask(size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : size // 2, size // 4 : size // 2] = 255
    return mask


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def make_dataset(root: Path, n_train: int = 4, n_test_good: int = 3, defects=None) -> Path:
    """A tiny valid MVTec-layout dataset of SIZE x SIZE PNGs."""
    rng = np.random.default_rng(0)
    for i in range(n_train):
        _write(root / "train" / "good" / f"{i:03d}.png", _image(rng))
    for i in range(n_test_good):
        _write(root / "test" / "good" / f"{i:03d}.png", _image(rng))
    for label, count in (defects or DEFECTS).items():
        for i in range(count):
            _write(root / "test" / label / f"{i:03d}.png", _image(rng))
            _write(root / "ground_truth" / label / f"{i:03d}_mask.png", _mask())
    return root


def run(root: Path, cfg: ValidationConfig | None = None, splits=None, **kwargs):
    facts = image_facts(scan_dataset(root), splits=splits)
    return validate_dataset(facts, cfg or ValidationConfig(), **kwargs)


def _suite_size(name: str = "images.json") -> int:
    return len(json.loads((REPO_ROOT / "expectations" / name).read_text())["expectations"])


def _splits(root: Path) -> dict[Path, str]:
    """A real stratified split of the dataset, as image_facts takes it."""
    return split_map(stratified_split(scan_dataset(root), 0.6, 0.2, 0.2, seed=0))


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "capsule")


def test_good_dataset_passes(dataset: Path):
    result = run(dataset)
    assert result.success, result.message()
    assert result.failures == []
    stats = result.statistics
    assert stats["images"] == 4 + 3 + 6
    assert stats["unsuccessful_expectations"] == 0
    assert stats["evaluated_expectations"] == _suite_size()
    assert stats["class_counts"] == {"crack": 3, "good": 7, "scratch": 3}
    assert Path(stats["root"]) == dataset
    assert "passed" in result.message()
    assert require_valid(result) is result


def test_image_facts(dataset: Path):
    _write(
        dataset / "train" / "good" / "gray16.png",
        _image(np.random.default_rng(1), 40, 1, np.uint16),
    )
    facts = image_facts(scan_dataset(dataset))
    assert list(facts.columns) == FACT_COLUMNS
    row = facts.set_index("path").loc[str(dataset / "train/good/gray16.png")]
    assert (row.height, row.width, row.channels, row["dtype"]) == (40, 40, 1, "uint16")
    assert row.readable and not row.mask_required and not row.has_mask
    assert row.split == "" and row.good_mask_area == 0 and row.mask_values == ""
    defect = facts[facts.label == "crack"].iloc[0]
    assert defect.has_mask and defect.mask_required and defect.mask_readable
    assert defect.mask_same_size and defect.mask_binary
    assert (defect.mask_height, defect.mask_width) == (SIZE, SIZE)
    assert defect.mask_values == "0,255"
    assert defect.mask_area == (SIZE // 4) ** 2
    assert defect.mask_area_fraction == pytest.approx(0.0625)
    assert pd.isna(defect.good_mask_area)
    assert len(defect.sha256) == 64 and defect.error == ""


def test_image_facts_splits_and_workers(dataset: Path):
    samples = scan_dataset(dataset)
    splits = _splits(dataset)
    facts = image_facts(samples, "good", splits, workers=4)
    assert facts["split"].tolist() == [splits[s.path] for s in samples]
    assert set(facts["split"]) == {"train", "val", "test"}
    # string keys work too; a path the map does not name gets ""
    partial = {str(samples[0].path): "val"}
    assert image_facts(samples, splits=partial)["split"].tolist()[:2] == ["val", ""]
    sequential = image_facts(samples, "good", splits, workers=1)
    pd.testing.assert_frame_equal(facts, sequential)


def test_good_mask_path(dataset: Path):
    samples = {s.path: s for s in scan_dataset(dataset)}
    train_good = samples[dataset / "train" / "good" / "000.png"]
    assert _good_mask_path(train_good) is None
    mask = _write(dataset / "ground_truth" / "good" / "000_mask.bmp", _mask())
    assert _good_mask_path(train_good) == mask
    assert _good_mask_path(samples[dataset / "test" / "good" / "000.png"]) == mask
    png = _write(dataset / "ground_truth" / "good" / "000_mask.png", _mask())
    assert _good_mask_path(train_good) == png  # .png first, as scan_dataset pairs masks


def test_sixteen_bit_and_grayscale_images_are_accepted(dataset: Path):
    rng = np.random.default_rng(2)
    _write(dataset / "train" / "good" / "gray.png", _image(rng, channels=1))
    _write(dataset / "train" / "good" / "deep.png", _image(rng, dtype=np.uint16))
    _write(dataset / "test" / "crack" / "rgba.png", _image(rng, channels=4))
    _write(dataset / "ground_truth" / "crack" / "rgba_mask.png", _mask())
    result = run(dataset)
    assert result.success, result.message()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_truncated(root: Path) -> None:
    _truncate(root / "test" / "crack" / "001.png")


def _zero_bytes(root: Path) -> None:
    (root / "train" / "good" / "001.png").write_bytes(b"")


def _corrupt_text(root: Path) -> None:
    (root / "train" / "good" / "002.png").write_text("this is not an image\n")


def _mask_other_size(root: Path) -> None:
    _write(root / "ground_truth" / "crack" / "002_mask.png", _mask(SIZE * 2))


def _mask_too_small(root: Path) -> None:
    _write(root / "ground_truth" / "scratch" / "002_mask.png", _mask(16))


def _mask_not_binary(root: Path) -> None:
    mask = _mask()
    mask[:4, :4] = 128
    _write(root / "ground_truth" / "scratch" / "000_mask.png", mask)


def _mask_missing(root: Path) -> None:
    (root / "ground_truth" / "scratch" / "001_mask.png").unlink()


def _mask_empty(root: Path) -> None:
    _write(root / "ground_truth" / "crack" / "000_mask.png", np.zeros((SIZE, SIZE), np.uint8))


def _good_with_mask(root: Path) -> None:
    # A stem only test/good has (train/good/<stem> would pair with the same mask).
    _write(root / "test" / "good" / "extra.png", _image(np.random.default_rng(5)))
    _write(root / "ground_truth" / "good" / "extra_mask.png", _mask())


def _too_small(root: Path) -> None:
    _write(root / "test" / "good" / "001.png", _image(np.random.default_rng(3), size=16))


def _float_pixels(root: Path) -> None:
    pixels = np.random.default_rng(4).random((SIZE, SIZE, 3), dtype=np.float32)
    _write(root / "train" / "good" / "000.tif", pixels)


@pytest.mark.parametrize(
    ("corrupt", "bad_file", "reasons"),
    [
        (_corrupt_truncated, "test/crack/001.png", ["can be decoded", "not a decodable image"]),
        (_corrupt_text, "train/good/002.png", ["can be decoded", "not a decodable image"]),
        (_zero_bytes, "train/good/001.png", ["can be decoded", "empty file"]),
        (
            _mask_other_size,
            "test/crack/002.png",
            ["height and width of the image", "mask 96x96, image 48x48"],
        ),
        (
            _mask_too_small,
            "test/scratch/002.png",
            ["Mask height", "mask_height=16", "mask_width=16", "mask 16x16, image 48x48"],
        ),
        (_mask_not_binary, "test/scratch/000.png", ["binary", "values other than 0"]),
        (_mask_missing, "test/scratch/001.png", ["has a ground-truth mask", "no mask file"]),
        (_mask_empty, "test/crack/000.png", ["not all black", "mask is empty"]),
        (
            _good_with_mask,
            "test/good/extra.png",
            ["no mask, or an empty one", "marking 144 defect pixels: ground_truth/good/extra_mask"],
        ),
        (_too_small, "test/good/001.png", ["height", "height=16", "width=16"]),
        (_float_pixels, "train/good/000.tif", ["8-bit or 16-bit", "dtype=float32"]),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_bad_file_fails_naming_file_and_reason(dataset: Path, corrupt, bad_file, reasons):
    corrupt(dataset)
    result = run(dataset)
    assert not result.success
    message = result.message()
    assert bad_file in message
    for reason in reasons:
        assert reason in message
    assert str(dataset) in message
    failing = {p for f in result.failures for p in f["examples"] if p}
    assert failing == {str(dataset / bad_file)}, message
    with pytest.raises(DataValidationError, match="Data validation failed"):
        require_valid(result)


def test_one_failure_per_root_cause(dataset: Path):
    _mask_missing(dataset)
    result = run(dataset)
    assert [f["column"] for f in result.failures] == ["has_mask"]
    (failure,) = result.failures
    assert failure["expectation"] == "expect_column_values_to_be_in_set"
    assert failure["unexpected_count"] == 1
    assert failure["kwargs"]["row_condition"]["column"]["name"] == "mask_required"
    # An unreadable defect image is reported as unreadable, not also as a mask size mismatch.
    _corrupt_truncated(dataset)
    result = run(dataset)
    assert [f["column"] for f in result.failures] == ["readable", "has_mask"]


def test_thresholds_come_from_config(dataset: Path):
    strict = replace(ValidationConfig(), min_side=SIZE + 1, allowed_channels=[1])
    result = run(dataset, strict)
    assert not result.success
    assert {f["column"] for f in result.failures} == {
        "height",
        "width",
        "mask_height",
        "mask_width",
        "channels",
    }
    height = next(f for f in result.failures if f["column"] == "height")
    assert height["kwargs"]["min_value"] == SIZE + 1
    assert height["unexpected_count"] == 13
    assert "and 8 more" in result.message()
    assert result.statistics["parameters"]["allowed_channels"] == [1]


def test_too_few_images_in_a_class(tmp_path: Path):
    root = make_dataset(tmp_path / "small", defects={"crack": 3, "scratch": 2})
    result = run(root)
    assert not result.success
    (failure,) = result.failures
    assert failure["column"] == "class_image_count"
    assert "failed for 1 class: class 'scratch' has 2 images" in result.message()
    assert "test/scratch/000.png, test/scratch/001.png" in result.message()
    # class_counts given by the caller win, also for a class without any image.
    result = run(root, class_counts={"scratch": 3, "dent": 0})
    assert "class 'dent' has 0 images" in result.message()
    assert "scratch" not in result.message()


def test_summary_markdown(dataset: Path):
    passed = run(dataset).summary_markdown()
    assert passed.startswith("## Data validation passed")
    assert "| good | 7 |" in passed and "| crack | 3 |" in passed
    assert "Failed checks" not in passed
    _mask_not_binary(dataset)
    _too_small(dataset)
    failed = run(dataset).summary_markdown()
    assert failed.startswith("## Data validation FAILED")
    assert "### Failed checks" in failed
    assert "`expect_column_values_to_be_in_set`" in failed
    assert "| mask_binary | 1 | test/scratch/000.png" in failed
    assert "test/good/001.png (height=16)" in failed
    assert "images: 13 (0 unreadable)" in failed


def test_data_docs(dataset: Path, tmp_path: Path):
    _mask_missing(dataset)
    docs = tmp_path / "docs"
    classes = replace(ValidationConfig(), expected_classes=["good", "crack", "scratch", "dent"])
    result = run(dataset, classes, data_docs_dir=docs)
    index = Path(result.statistics["data_docs"])
    assert index == docs.resolve() / "index.html"
    assert index.is_file()
    pages = [p for p in docs.rglob("*.html") if p != index]
    assert any("validations" in p.parts for p in pages)
    suite_page = next(p for p in pages if "expectations" in p.parts)
    # The plain-words notes of the suite show in Data Docs.
    assert "ground-truth mask" in suite_page.read_text()
    assert "two different splits" in suite_page.read_text()
    assert "expected_classes" in suite_page.read_text()  # the class suite, added when configured
    assert "Data Docs:" in result.summary_markdown()


def test_invalid_suite_is_reported(dataset: Path, tmp_path: Path):
    suite = tmp_path / "bad.json"
    suite.write_text(
        json.dumps(
            {
                "name": "bad",
                "expectations": [
                    {"type": "expect_column_values_to_be_between", "kwargs": {}},
                ],
            }
        )
    )
    with pytest.raises(ValueError, match="expectation #0"):
        run(dataset, replace(ValidationConfig(), suite=str(suite)))
    suite.write_text(
        json.dumps(
            {
                "name": "needs_param",
                "expectations": [
                    {
                        "type": "expect_column_max_to_be_between",
                        "kwargs": {"column": "height", "max_value": {"$PARAMETER": "nope"}},
                    }
                ],
            }
        )
    )
    with pytest.raises(ValueError, match="nope"):
        run(dataset, replace(ValidationConfig(), suite=str(suite)))


def test_good_image_with_an_empty_mask_passes(dataset: Path):
    _write(dataset / "ground_truth" / "good" / "000_mask.png", np.zeros((SIZE, SIZE), np.uint8))
    (dataset / "ground_truth" / "good" / "001_mask.png").write_bytes(b"")  # zero bytes: no mask
    facts = image_facts(scan_dataset(dataset))
    good = facts.set_index("path").loc[str(dataset / "train/good/000.png")]
    assert good.has_mask and good.mask_values == "0" and good.good_mask_area == 0
    assert not facts.set_index("path").loc[str(dataset / "train/good/001.png")].has_mask
    result = validate_dataset(facts, ValidationConfig())
    assert result.success, result.message()


def _copy(root: Path, source: str, target: str) -> tuple[Path, Path]:
    shutil.copyfile(root / source, root / target)
    return root / source, root / target


def test_same_image_in_two_splits_fails_naming_both_copies(dataset: Path):
    original, copy = _copy(dataset, "test/good/000.png", "test/good/copy.png")
    splits = _splits(dataset)
    splits[copy] = next(s for s in ("train", "val", "test") if s != splits[original])
    result = run(dataset, splits=splits)
    assert not result.success
    (failure,) = result.failures
    assert failure["column"] == "sha256_split_count"
    assert set(failure["examples"]) == {str(original), str(copy)}
    assert "- splits: test " in result.summary_markdown()
    message = result.message()
    assert "two different splits" in message
    assert f"test/good/copy.png (in {splits[copy]}, same bytes as test/good/000.png" in message
    assert f"test/good/000.png (in {splits[original]}, same bytes as test/good/copy.png" in message
    # Leakage fails even when duplicates are allowed.
    assert not run(dataset, replace(ValidationConfig(), allow_duplicates=True), splits).success


def test_duplicate_in_one_split_fails_unless_allowed(dataset: Path):
    original, copy = _copy(dataset, "test/crack/001.png", "test/crack/copy.png")
    _copy(dataset, "ground_truth/crack/001_mask.png", "ground_truth/crack/copy_mask.png")
    splits = _splits(dataset)
    splits[copy] = splits[original]
    result = run(dataset, splits=splits)
    assert not result.success
    (failure,) = result.failures
    assert failure["column"] == "sha256_count_in_split"
    assert set(failure["examples"]) == {str(original), str(copy)}
    assert "duplicated (same bytes) inside one split" in result.message()
    assert "test/crack/copy.png (in " in result.message()
    assert "same bytes as test/crack/001.png" in result.message()
    allowed = run(dataset, replace(ValidationConfig(), allow_duplicates=True), splits)
    assert allowed.success, allowed.message()
    assert allowed.statistics["parameters"]["max_copies_in_split"] == 14


def test_without_splits_leakage_passes_and_the_dataset_is_one_group(dataset: Path):
    facts = image_facts(scan_dataset(dataset))
    assert set(facts["split"]) == {""}
    result = validate_dataset(facts.drop(columns="split"), ValidationConfig())  # old tables too
    assert result.success, result.message()
    assert result.statistics["evaluated_expectations"] == _suite_size()
    _copy(dataset, "train/good/000.png", "test/good/copy.png")
    result = run(dataset)
    (failure,) = result.failures
    assert failure["column"] == "sha256_count_in_split"
    assert "test/good/copy.png (same bytes as train/good/000.png)" in result.message()
    assert run(dataset, replace(ValidationConfig(), allow_duplicates=True)).success


def test_classes_must_match_expected_classes(dataset: Path):
    expected = replace(ValidationConfig(), expected_classes=["good", "crack", "scratch"])
    result = run(dataset, expected)
    assert result.success, result.message()
    assert result.statistics["evaluated_expectations"] == _suite_size() + _suite_size(
        "classes.json"
    )
    # A class folder the config does not name: fails naming its files.
    rng = np.random.default_rng(6)
    for i in range(3):
        _write(dataset / "test" / "dent" / f"{i:03d}.png", _image(rng))
        _write(dataset / "ground_truth" / "dent" / f"{i:03d}_mask.png", _mask())
    result = run(dataset, expected)
    assert not result.success
    (failure,) = result.failures
    assert failure["column"] == "label" and failure["unexpected_count"] == 3
    assert "test/dent/000.png (class 'dent' is not expected)" in result.message()
    with pytest.raises(DataValidationError, match="test/dent/002.png"):
        require_valid(result)
    # An expected class with no image: fails naming the class.
    missing = replace(expected, expected_classes=["good", "crack", "scratch", "dent", "squeeze"])
    result = run(dataset, missing)
    assert not result.success
    (failure,) = result.failures
    assert failure["expectation"] == "expect_column_distinct_values_to_contain_set"
    assert "failed for 1 class: class 'squeeze' has no image" in result.message()


def test_benchmark_script_runs(dataset: Path, capsys):
    spec = importlib.util.spec_from_file_location(
        "validation_speed", REPO_ROOT / "benchmarks" / "validation_speed.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--root", str(dataset), "--repeats", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    what = {line["what"] for line in lines}
    assert {"ge_import", "decode", "validate", "ratio"} <= what
    assert module.main(["--root", str(dataset / "absent")]) == 0
    assert "skipped" in json.loads(capsys.readouterr().out.splitlines()[-1])


@pytest.mark.real_data
def test_real_capsule_data_passes(capsule_root: Path):
    _check_real_data(
        capsule_root, ["good", "crack", "faulty_imprint", "poke", "scratch", "squeeze"]
    )


@pytest.mark.real_data
def test_real_pill_data_passes(pill_root: Path):
    """256x256 images, and a `combined` class of parts with several defects."""
    _check_real_data(
        pill_root,
        [
            "good",
            "color",
            "combined",
            "contamination",
            "crack",
            "faulty_imprint",
            "pill_type",
            "scratch",
        ],
    )


def _check_real_data(root: Path, classes: list[str]) -> None:
    samples = scan_dataset(root)
    splits = split_map(stratified_split(samples, 0.7, 0.15, 0.15, seed=42))
    facts = image_facts(samples, "good", splits)
    assert len(facts) == len(samples) and facts["readable"].all()
    cfg = replace(
        ValidationConfig(),
        expected_classes=classes,
    )
    result = validate_dataset(facts, cfg)
    assert result.success, result.message()
    assert result.statistics["splits"] == {
        name: sum(s == name for s in splits.values()) for name in ("test", "train", "val")
    }
