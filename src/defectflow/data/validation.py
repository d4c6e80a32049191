"""Data validation: facts about every image, checked by a Great Expectations suite.

`image_facts` opens every image (and its mask) once, in a thread pool, and writes down what
training relies on: readable, size, channels, pixel type, content hash, split, mask present / same
size / binary / not empty, and whether a good image has a non-empty mask beside it. The checks
themselves are not Python code: they are a Great Expectations suite stored as JSON
(`expectations/images.json`, `validation.suite` in the config), loaded at run time, whose
thresholds are suite parameters (`{"$PARAMETER": "min_side"}`) filled from the config.

`validate_dataset` runs the suite with the GX 1.x fluent API (ephemeral context, pandas data
source, dataframe asset, whole-dataframe batch, ValidationDefinition, Checkpoint) and turns the
result into a `ValidationResult` that says, in plain words, which check failed on which files
(`defectflow.data.validation_report`). Its steps: the suite, the checked table, the run, the
failures, the statistics, the Data Docs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from defectflow.config import packaged, resolve_path
from defectflow.data.data_docs_assets import make_offline
from defectflow.data.mvtec import Sample
from defectflow.data.split import SplitSample
from defectflow.data.validation_report import (
    ValidationResult,
    dataset_root,
    empty_classes_failure,
    failure_summaries,
    plain,
)

# Set before great_expectations is first imported (it is imported lazily: it takes seconds).
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

#: How many distinct mask values `mask_values` lists before it only counts them.
MAX_MASK_VALUES = 8
#: Mask file names tried beside an image: ground_truth/<class>/<stem>_mask<suffix>.
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")

FACT_COLUMNS = [
    "path",
    "label",
    "origin",
    "split",
    "readable",
    "error",
    "height",
    "width",
    "channels",
    "dtype",
    "has_mask",
    "mask_required",
    "mask_path",
    "mask_readable",
    "mask_height",
    "mask_width",
    "mask_same_size",
    "mask_binary",
    "mask_values",
    "mask_area",
    "mask_area_fraction",
    "good_mask_area",
    "sha256",
]
_INT_COLUMNS = [
    "height",
    "width",
    "channels",
    "mask_height",
    "mask_width",
    "mask_area",
    "good_mask_area",
]
_BOOL_COLUMNS = [
    "readable",
    "has_mask",
    "mask_required",
    "mask_readable",
    "mask_same_size",
    "mask_binary",
]


class DataValidationError(ValueError):
    """The dataset failed its data validation suite."""


# ---------------------------------------------------------------------------------------------
# Facts


def _decode(data: bytes) -> tuple[np.ndarray | None, str]:
    """Raw decode (no conversion), so dtype and channels are the file's own."""
    if not data:
        return None, "empty file: expected a PNG, JPEG, BMP or TIFF image"
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # pragma: no cover - imdecode returns None for bad bytes
        return None, f"not a decodable image ({exc})"
    if image is None:
        return None, "not a decodable image (truncated, corrupt or not a PNG/JPEG/BMP/TIFF file)"
    return image, ""


def _read(path: Path) -> tuple[bytes, np.ndarray | None, str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return b"", None, f"cannot read file: {exc.strerror or exc}"
    image, error = _decode(data)
    return data, image, error


def _good_mask_path(sample: Sample) -> Path | None:
    """The mask file beside a good image, if any: <root>/ground_truth/<class>/<stem>_mask.*

    scan_dataset gives good images no mask_path; a mask found here must be empty. <root> is
    `path.parents[2]` for <root>/train/good/x.png and <root>/test/good/x.png.
    """
    path = Path(sample.path)
    if len(path.parents) < 3:
        return None
    folder = path.parents[2] / "ground_truth" / sample.label
    for suffix in dict.fromkeys((".png", path.suffix.lower(), *MASK_SUFFIXES)):
        candidate = folder / f"{path.stem}_mask{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _mask_values(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Distinct pixel values (sorted) and the number of non-zero pixels."""
    area = int(np.count_nonzero(mask))
    if area == 0:
        return np.zeros(1, mask.dtype), 0
    top = mask.max()
    if int(np.count_nonzero(mask == top)) == area:  # the usual binary mask: 0 and one value
        return np.array([0, top] if area < mask.size else [top], mask.dtype), area
    if mask.dtype == np.uint8:  # a histogram is much faster than a sort
        return np.flatnonzero(np.bincount(mask.ravel(), minlength=256)), area
    return np.unique(mask), area


def _values_text(values: np.ndarray) -> str:
    shown = ",".join(str(v) for v in values[:MAX_MASK_VALUES].tolist())
    more = len(values) - MAX_MASK_VALUES
    return f"{shown},... ({len(values)} values)" if more > 0 else shown


def _fact_row(sample: Sample, good_class: str, split: str) -> dict[str, Any]:
    path = Path(sample.path)
    data, image, error = _read(path)
    is_good = sample.label == good_class
    row: dict[str, Any] = {
        "path": str(path),
        "label": sample.label,
        "origin": sample.origin,
        "split": split,
        "readable": image is not None,
        "error": error,
        "height": None,
        "width": None,
        "channels": None,
        "dtype": None,
        "has_mask": False,
        "mask_required": not is_good,
        "mask_path": None,
        "mask_readable": False,
        "mask_height": None,
        "mask_width": None,
        "mask_same_size": False,
        "mask_binary": False,
        "mask_values": "",
        "mask_area": None,
        "mask_area_fraction": float("nan"),
        "good_mask_area": 0 if is_good else None,
        "sha256": hashlib.sha256(data).hexdigest() if data else None,
    }
    del data
    if image is not None:
        row.update(
            height=int(image.shape[0]),
            width=int(image.shape[1]),
            channels=1 if image.ndim == 2 else int(image.shape[2]),
            dtype=str(image.dtype),
        )
    if is_good:
        mask_path = _good_mask_path(sample)
    else:
        mask_path = Path(sample.mask_path) if sample.mask_path is not None else None
    if mask_path is None or not mask_path.is_file():
        return row
    row["mask_path"] = str(mask_path)
    mask_bytes, mask, mask_error = _read(mask_path)
    if is_good and not mask_bytes and not mask_error.startswith("cannot read"):
        return row  # a zero-byte mask beside a good image marks nothing: as good as no mask
    row["has_mask"] = True
    if mask is None:
        row["error"] = "; ".join(e for e in (error, f"mask {mask_path.name}: {mask_error}") if e)
        row["good_mask_area"] = None  # unknown: the unreadable mask fails on its own
        return row
    if mask.ndim == 3:  # a colour-saved mask: any non-zero channel is defect
        mask = mask.max(axis=2)
    values, area = _mask_values(mask)
    row.update(
        mask_readable=True,
        mask_height=int(mask.shape[0]),
        mask_width=int(mask.shape[1]),
        mask_same_size=image is not None and mask.shape[:2] == image.shape[:2],
        mask_binary=len(values) <= 1 or (len(values) == 2 and values[0] == 0),
        mask_values=_values_text(values),
        mask_area=area,
        mask_area_fraction=area / mask.size,
    )
    if is_good:
        row["good_mask_area"] = area
    return row


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def split_map(rows: list[SplitSample]) -> dict[Path, str]:
    """`stratified_split` / `read_manifest` rows as the `splits` argument of `image_facts`."""
    return {Path(r.sample.path): r.split for r in rows}


def image_facts(
    samples: list[Sample],
    good_class: str = "good",
    splits: dict[Path, str] | None = None,
    workers: int | None = None,
) -> pd.DataFrame:
    """One row per image with everything the validation suite checks. Never raises on bad files.

    `splits` maps each sample's path to "train" / "val" / "test" (the `split` column; "" when
    not given, or for a path it does not name). Images are read, hashed and decoded once each,
    by `workers` threads (default min(8, CPUs); OpenCV decoding and hashing release the GIL).
    """
    lookup = {Path(k): str(v) for k, v in (splits or {}).items()}

    def row(sample: Sample) -> dict[str, Any]:
        return _fact_row(sample, good_class, lookup.get(Path(sample.path), ""))

    n_workers = default_workers() if workers is None else max(1, int(workers))
    if n_workers > 1 and len(samples) > 1:
        with ThreadPoolExecutor(min(n_workers, len(samples))) as pool:
            rows = list(pool.map(row, samples))
    else:
        rows = [row(s) for s in samples]
    frame = pd.DataFrame(rows, columns=FACT_COLUMNS)
    for column in _INT_COLUMNS:
        frame[column] = frame[column].astype("Int64")
    for column in _BOOL_COLUMNS:
        frame[column] = frame[column].astype(bool)
    frame["mask_area_fraction"] = frame["mask_area_fraction"].astype(float)
    return frame


# ---------------------------------------------------------------------------------------------
# Result


def require_valid(result: ValidationResult, split_problem: str = "") -> ValidationResult:
    """Raise with the gate's message; also when the gate passed but the data could not be split
    (e.g. a class with fewer images than a 3-way split needs while min_images_per_class allows it)."""
    if not result.success:
        raise DataValidationError(result.message())
    if split_problem:
        raise DataValidationError(
            f"the data passed validation but cannot be split: {split_problem}"
        )
    return result


def sha256_by_path(facts: pd.DataFrame) -> dict[Path, str]:
    """Content hash of every readable image in the facts table."""
    return {
        Path(p): h
        for p, h in zip(facts["path"], facts["sha256"], strict=True)
        if isinstance(h, str) and h
    }


def with_splits(facts: pd.DataFrame, rows: list[SplitSample]) -> pd.DataFrame:
    """The facts table with each image's split filled in (\"\" where there is none)."""
    splits = {str(k): v for k, v in split_map(rows).items()}
    return facts.assign(split=facts["path"].map(splits).fillna(""))


# ---------------------------------------------------------------------------------------------
# Running the suite


def _suite_file(value: str) -> Path:
    """A suite by the name of one the project ships (`images`, `classes`: package data), or a
    JSON file path relative to the working directory."""
    if "/" not in value and not value.endswith(".json"):
        return packaged("expectations", f"{value}.json")
    return resolve_path(value)


def suite_path(cfg_validation) -> Path:
    return _suite_file(cfg_validation.suite)


def suite_paths(cfg_validation) -> list[Path]:
    """The main suite, plus the class-set suite when `expected_classes` is given."""
    paths = [suite_path(cfg_validation)]
    if list(getattr(cfg_validation, "expected_classes", None) or []):
        paths.append(_suite_file(getattr(cfg_validation, "classes_suite", "classes")))
    return paths


def _suite_parameters(cfg_validation, n_images: int = 1) -> dict[str, Any]:
    allow_duplicates = bool(getattr(cfg_validation, "allow_duplicates", False))
    return {
        "min_side": int(cfg_validation.min_side),
        "max_side": int(cfg_validation.max_side),
        "allowed_channels": [int(c) for c in cfg_validation.allowed_channels],
        "min_images_per_class": int(cfg_validation.min_images_per_class),
        # Copies of one file a split may hold: 1, or (duplicates allowed) any number.
        "max_copies_in_split": max(1, int(n_images)) if allow_duplicates else 1,
        "expected_classes": [
            str(c) for c in (getattr(cfg_validation, "expected_classes", None) or [])
        ],
    }


def _referenced_parameters(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$PARAMETER"]} if "$PARAMETER" in node else set()
        return found.union(*(_referenced_parameters(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_referenced_parameters(v) for v in node))
    return set()


def load_suite(path: Path, parameters: dict[str, Any], extra: list[Path] | tuple = ()):
    """The JSON suite as a gx.ExpectationSuite; fails loudly on any invalid expectation.

    The expectations of the `extra` suite files are appended (under the first suite's name).
    """
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    def read(file: Path) -> dict:
        try:
            spec = json.loads(Path(file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot load the expectation suite {file}: {exc}") from exc
        missing = _referenced_parameters(spec) - set(parameters)
        if missing:
            raise ValueError(
                f"{file} uses suite parameters with no value: {', '.join(sorted(missing))}"
            )
        return copy.deepcopy(spec)

    spec = read(path)
    for file in extra:
        spec.setdefault("expectations", []).extend(read(file).get("expectations", []))
    for i, expectation in enumerate(spec.get("expectations", [])):
        # GX 1.x renders an expectation's top-level `notes` in Data Docs, no longer `meta.notes`.
        notes = expectation.get("meta", {}).get("notes")
        if notes and not expectation.get("notes"):
            expectation["notes"] = notes
        # gx.ExpectationSuite(...) only logs and drops an invalid expectation: check each first.
        try:
            ExpectationConfiguration(**expectation).to_domain_obj()
        except Exception as exc:
            kind = expectation.get("type", "?") if isinstance(expectation, dict) else "?"
            raise ValueError(f"{path}: expectation #{i} ({kind}) is invalid: {exc}") from exc
    return gx.ExpectationSuite(**spec)


def _context(data_docs_dir: Path | None):
    """An ephemeral GX context; with `data_docs_dir` (absolute), a Data Docs site there."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if data_docs_dir is not None:  # the site `_build_data_docs` builds after the run
        data_docs_dir.mkdir(parents=True, exist_ok=True)
        sites["local_site"] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(data_docs_dir),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    # Ephemeral: suites, results and checkpoints live in memory; only Data Docs touch disk.
    return gx.get_context(mode="ephemeral", project_config=config)


def _add_copy_counts(table: pd.DataFrame) -> None:
    """`sha256_count_in_split`: rows with the same bytes in the same split (1: unique there);
    `sha256_split_count`: distinct non-empty splits holding those bytes (2+: leakage).

    Rows without a hash (unreadable files) get <NA>, which the checks skip.
    """
    n = len(table)
    table["sha256_count_in_split"] = pd.array([pd.NA] * n, dtype="Int64")
    table["sha256_split_count"] = pd.array([pd.NA] * n, dtype="Int64")
    if "sha256" not in table or not n:
        return
    known = table["sha256"].notna()
    if not known.any():
        return
    hashed = table.loc[known, ["sha256", "split"]]
    in_split = hashed.groupby(["sha256", "split"])["split"].transform("size")
    splits = hashed[hashed["split"] != ""].groupby("sha256")["split"].nunique()
    table.loc[known, "sha256_count_in_split"] = in_split.astype("Int64")
    table.loc[known, "sha256_split_count"] = hashed["sha256"].map(splits).fillna(0).astype("Int64")


def _checked_table(
    facts: pd.DataFrame, class_counts: dict[str, int] | None
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The table the suite checks, and the number of images of every class.

    The facts with `split` filled ("" where none), the copy counts (`_add_copy_counts`) and
    `class_image_count`, from `class_counts` where it names a class, else counted."""
    table = facts.reset_index(drop=True).copy()
    table["split"] = table["split"].fillna("").astype(str) if "split" in table else ""
    _add_copy_counts(table)
    counts = {str(k): int(v) for k, v in (class_counts or {}).items()}
    if "label" in table:
        observed = table["label"].value_counts().to_dict()
        counts = {**{str(k): int(v) for k, v in observed.items()}, **counts}
        table["class_image_count"] = table["label"].map(counts).astype("Int64")
    return table, counts


def _save_table(table: pd.DataFrame, facts_csv: Path) -> None:
    Path(facts_csv).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(facts_csv, index=False)


def _run_suite(context, suite, table: pd.DataFrame, parameters: dict[str, Any]):
    """Run `suite` on `table`: pandas data source, dataframe asset, whole-dataframe batch,
    ValidationDefinition, Checkpoint. The suite's result (an ExpectationSuiteValidationResult),
    every failing row named by its path and label."""
    import great_expectations as gx

    batch = (
        context.data_sources.add_pandas("defectflow")
        .add_dataframe_asset("image_facts")
        .add_batch_definition_whole_dataframe("all_images")
    )
    suite = context.suites.add(suite)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{suite.name}_on_image_facts", data=batch, suite=suite)
    )
    index_columns = [c for c in ("path", "label") if c in table]
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="defectflow_data_validation",
            validation_definitions=[definition],
            result_format={
                "result_format": "COMPLETE",
                "unexpected_index_column_names": index_columns,
            },
        )
    )
    # GX 1.24 resolves the suite's {"$PARAMETER": name} thresholds from expectation_parameters
    # (checked: the results carry the config values), so the JSON needs no rewriting.
    run = checkpoint.run(batch_parameters={"dataframe": table}, expectation_parameters=parameters)
    (suite_result,) = run.run_results.values()
    return suite_result


def _statistics(
    suite_result,
    table: pd.DataFrame,
    counts: dict[str, int],
    paths: list[Path],
    suite_name: str,
    root: str,
    parameters: dict[str, Any],
) -> dict:
    """GX's counts of evaluated and passed checks, with what the run checked: the suites,
    images, classes, splits and the parameters the thresholds came from."""
    return {
        **plain(dict(suite_result.statistics)),
        "suite": str(paths[0]),
        "suites": [str(p) for p in paths],
        "suite_name": suite_name,
        "images": len(table),
        "unreadable": int((~table["readable"]).sum()) if "readable" in table else 0,
        "class_counts": dict(sorted(counts.items())),
        "root": root,
        "splits": {k: int(v) for k, v in sorted(table["split"].value_counts().items()) if k},
        "parameters": parameters,
    }


def _build_data_docs(context, data_docs_dir: Path) -> str:
    """Build the Data Docs site in `data_docs_dir` (the folder `_context` configured) and
    make it work offline; the path of its index.html.

    Renders the suite page (with the notes) and this run's result page: the checkpoint keeps
    its result in the context's in-memory store, so no UpdateDataDocsAction is needed."""
    context.build_data_docs()
    make_offline(data_docs_dir)  # the pages' scripts and styles from the site itself
    return str(data_docs_dir / "index.html")


def validate_dataset(
    facts: pd.DataFrame,
    cfg_validation,
    class_counts: dict[str, int] | None = None,
    data_docs_dir: Path | None = None,
    facts_csv: Path | None = None,
) -> ValidationResult:
    """Run the JSON suite (`cfg_validation.suite`) on the facts table.

    `class_counts` (class -> number of images) defaults to the counts of `facts.label`; it fills
    the `class_image_count` column the per-class minimum is checked on. The copy counts the
    duplicate and leakage checks use come from `sha256` and `split`: without splits (all ""),
    leakage passes trivially and the whole dataset is one group for the duplicate check. With
    `facts_csv`, the exact table the suite checks is saved there (for people and later runs).
    With `data_docs_dir`, Data Docs HTML are built there and `statistics["data_docs"]` is its
    index.html.
    """
    paths = suite_paths(cfg_validation)
    parameters = _suite_parameters(cfg_validation, len(facts))
    suite = load_suite(paths[0], parameters, paths[1:])

    table, counts = _checked_table(facts, class_counts)
    if facts_csv is not None:
        _save_table(table, facts_csv)

    docs_dir = Path(data_docs_dir).resolve() if data_docs_dir is not None else None
    context = _context(docs_dir)
    suite_result = _run_suite(context, suite, table, parameters)

    root = dataset_root([str(p) for p in table.get("path", [])])
    failures = failure_summaries(suite_result, table, root)
    # A class named in class_counts with no image at all has no row to fail on.
    no_images = empty_classes_failure(counts, table, parameters["min_images_per_class"])
    if no_images is not None:
        failures.append(no_images)

    statistics = _statistics(suite_result, table, counts, paths, suite.name, root, parameters)
    if docs_dir is not None:
        statistics["data_docs"] = _build_data_docs(context, docs_dir)
    return ValidationResult(
        success=bool(suite_result.success) and no_images is None,
        statistics=statistics,
        failures=failures,
    )
