"""Data validation: facts about every image, checked by a Great Expectations suite.

`image_facts` opens every image (and its mask) once, in a thread pool, and writes down what
training relies on: readable, size, channels, pixel type, content hash, split, mask present / same
size / binary / not empty, and whether a good image has a non-empty mask beside it. The checks
themselves are not Python code: they are a Great Expectations suite stored as JSON
(`expectations/images.json`, `validation.suite` in the config), loaded at run time, whose
thresholds are suite parameters (`{"$PARAMETER": "min_side"}`) filled from the config.

`validate_dataset` runs the suite with the GX 1.x fluent API (ephemeral context, pandas data
source, dataframe asset, whole-dataframe batch, ValidationDefinition, Checkpoint) and turns the
result into a `ValidationResult` that says, in plain words, which check failed on which files.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from defectflow.config import REPO_ROOT
from defectflow.data.data_docs_assets import make_offline
from defectflow.data.mvtec import Sample
from defectflow.data.split import SplitSample

# Set before great_expectations is first imported (it is imported lazily: it takes seconds).
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

#: How many failing files a failure keeps (and the message names) per check.
MAX_EXAMPLES = 5

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


@dataclass
class ValidationResult:
    success: bool
    statistics: dict = field(default_factory=dict)
    #: One dict per failed check: expectation, column, kwargs, notes, unexpected_count,
    #: element_count, examples (paths), values (the failing values) and reasons (per example).
    failures: list[dict] = field(default_factory=list)

    def _root(self) -> str:
        return self.statistics.get("root", "")

    def _display(self, path: str) -> str:
        return _relative(path, self._root())

    def _examples(self, failure: dict) -> str:
        shown = []
        for path, reason in zip(failure["examples"], failure["reasons"], strict=True):
            name = self._display(path) if path else ""
            shown.append(f"{name} ({reason})" if name and reason else name or reason)
        more = failure["unexpected_count"] - len(shown)
        text = ", ".join(s for s in shown if s)
        return f"{text} and {more} more" if more > 0 and text else text

    def message(self) -> str:
        """One paragraph: what failed, on which files (for an error message)."""
        stats = self.statistics
        where = f" under {self._root()}" if self._root() else ""
        if self.success:
            return (
                f"Data validation passed: {stats.get('images', 0)} images{where}, "
                f"{stats.get('evaluated_expectations', 0)} checks."
            )
        parts = []
        for failure in self.failures:
            what = failure.get("notes") or failure["expectation"]
            what = what.rstrip(".").replace("`", "")
            if failure.get("exception"):
                parts.append(f"{what}: the check could not run ({failure['exception']})")
                continue
            count = failure["unexpected_count"]
            examples = self._examples(failure)
            unit = failure.get("unit") or "image"
            unit = unit if count == 1 else f"{unit}es" if unit.endswith("s") else f"{unit}s"
            detail = f"{count} {unit}: {examples}" if examples else f"{count} {unit}"
            parts.append(f"{what}: failed for {detail}" if count else f"{what}: failed")
        n_failed = len(self.failures)
        return (
            f"Data validation failed for {stats.get('images', 0)} images{where} "
            f"({n_failed} of {stats.get('evaluated_expectations', n_failed)} checks failed). "
            + "; ".join(parts)
            + "."
        )

    def summary_markdown(self) -> str:
        stats = self.statistics
        status = "passed" if self.success else "FAILED"
        lines = [
            f"## Data validation {status}",
            "",
            f"- suite: `{stats.get('suite', '')}`",
            f"- dataset: `{self._root()}`",
            f"- images: {stats.get('images', 0)} ({stats.get('unreadable', 0)} unreadable)",
            *(
                ["- splits: " + ", ".join(f"{k} {v}" for k, v in stats["splits"].items())]
                if stats.get("splits")
                else []
            ),
            f"- checks passed: {stats.get('successful_expectations', 0)}"
            f" / {stats.get('evaluated_expectations', 0)}",
        ]
        if stats.get("data_docs"):
            lines.append(f"- Data Docs: {stats['data_docs']}")
        classes = stats.get("class_counts") or {}
        if classes:
            lines += ["", "| class | images |", "|---|---:|"]
            lines += [f"| {name} | {count} |" for name, count in classes.items()]
        if self.failures:
            lines += [
                "",
                "### Failed checks",
                "",
                "| check | column | failing | examples |",
                "|---|---|---:|---|",
            ]
            for f in self.failures:
                what = (f.get("notes") or "").replace("|", "\\|")
                check = f"{what}<br>`{f['expectation']}`" if what else f"`{f['expectation']}`"
                examples = (f.get("exception") or self._examples(f)).replace("|", "\\|")
                lines.append(
                    f"| {check} | {f.get('column') or ''} | {f['unexpected_count']} | {examples} |"
                )
        return "\n".join(lines) + "\n"


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


def _repo_path(value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def suite_path(cfg_validation) -> Path:
    return _repo_path(cfg_validation.suite)


def suite_paths(cfg_validation) -> list[Path]:
    """The main suite, plus the class-set suite when `expected_classes` is given."""
    paths = [suite_path(cfg_validation)]
    if list(getattr(cfg_validation, "expected_classes", None) or []):
        paths.append(
            _repo_path(getattr(cfg_validation, "classes_suite", "expectations/classes.json"))
        )
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
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if data_docs_dir is not None:
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


def _plain(value: Any) -> Any:
    """numpy / pandas scalars to JSON-able Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _exception_text(info: Any) -> str:
    if not isinstance(info, dict):
        return ""
    if "raised_exception" in info:
        return str(info.get("exception_message") or "") if info["raised_exception"] else ""
    texts = (_exception_text(v) for v in info.values())
    return "; ".join(t for t in texts if t)


def _relative(path: str, root: str) -> str:
    if root and path.startswith(root):
        return Path(os.path.relpath(path, root)).as_posix()
    return path


@dataclass
class _Context:
    """What the failure reasons look up: rows by path, copies by sha256, the dataset root."""

    rows: dict[str, dict]
    copies: dict[str, list[dict]]
    root: str


def _copies_text(row: dict, ctx: _Context, same_split: bool) -> str:
    others = [
        r for r in ctx.copies.get(row.get("sha256") or "", []) if r["path"] != row.get("path")
    ]
    if same_split:
        others = [r for r in others if r.get("split") == row.get("split")]
    names = [
        _relative(r["path"], ctx.root) + (f" in {r['split']}" if r.get("split") else "")
        for r in others[:MAX_EXAMPLES]
    ]
    more = f" and {len(others) - len(names)} more" if len(others) > len(names) else ""
    where = f"in {row['split']}, " if row.get("split") else ""
    return f"{where}same bytes as {', '.join(names)}{more}" if names else "duplicate"


def _reason(column: str | None, entry: dict, ctx: _Context) -> str:
    row = ctx.rows.get(entry.get("path"), {})
    if column in {"readable", "mask_readable"}:
        return row.get("error") or "unreadable"
    if column == "has_mask":
        return "no mask file"
    if column == "mask_same_size":
        return (
            f"mask {row.get('mask_width')}x{row.get('mask_height')}, "
            f"image {row.get('width')}x{row.get('height')}"
        )
    if column == "mask_binary":
        return "mask has values other than 0 and one defect value"
    if column == "mask_area_fraction":
        return "mask is empty"
    if column == "good_mask_area":
        mask = _relative(str(row.get("mask_path") or ""), ctx.root)
        return f"good image with a mask marking {row.get('good_mask_area')} defect pixels: {mask}"
    if column == "sha256_split_count":
        return _copies_text(row, ctx, same_split=False)
    if column == "sha256_count_in_split":
        return _copies_text(row, ctx, same_split=True)
    if column == "label":
        return f"class {row.get('label', entry.get('label'))!r} is not expected"
    if column in entry:
        return f"{column}={_plain(entry[column])}"
    return ""


def _failure(result, ctx: _Context) -> dict:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
    column = kwargs.get("column")
    details = result.result or {}
    entries = [e for e in details.get("unexpected_index_list") or [] if isinstance(e, dict)]
    failure = {
        "expectation": config.type,
        "column": column,
        "kwargs": _plain(kwargs),
        "notes": config.notes if isinstance(config.notes, str) else None,
        "unexpected_count": int(details.get("unexpected_count") or 0),
        "element_count": int(details.get("element_count") or 0),
        "examples": [],
        "values": [],
        "reasons": [],
        "exception": _exception_text(result.exception_info) or None,
    }
    if config.type == "expect_column_distinct_values_to_contain_set":  # values, not rows
        missing = [str(v) for v in details.get("partial_missing_list") or []]
        failure.update(unit="class", unexpected_count=int(details["missing_count"] or 0))
        for value in missing[:MAX_EXAMPLES]:
            failure["examples"].append("")
            failure["values"].append(value)
            failure["reasons"].append(f"class {value!r} has no image")
        return failure
    if column == "class_image_count" and entries:
        # One example per class, not per image: the class is what is short of images.
        by_class: dict[str, int] = {}
        files: dict[str, list[str]] = {}
        for e in entries:
            by_class.setdefault(str(e.get("label")), int(e.get(column) or 0))
            files.setdefault(str(e.get("label")), []).append(
                _relative(str(e.get("path", "")), ctx.root)
            )
        for label, count in list(by_class.items())[:MAX_EXAMPLES]:
            names = files[label][:3] + (["..."] if len(files[label]) > 3 else [])
            failure["examples"].append("")
            failure["values"].append(count)
            failure["reasons"].append(f"class {label!r} has {count} images: {', '.join(names)}")
        failure.update(unexpected_count=len(by_class), unit="class")
        return failure
    for e in entries[:MAX_EXAMPLES]:
        failure["examples"].append(str(e.get("path", "")))
        failure["values"].append(_plain(e.get(column)) if column else None)
        failure["reasons"].append(_reason(column, e, ctx))
    if not entries and failure["unexpected_count"] == 0 and not failure["exception"]:
        observed = details.get("observed_value")
        if observed is not None:
            failure["reasons"].append(f"observed {_plain(observed)}")
            failure["examples"].append("")
    return failure


def _dataset_root(paths: list[str]) -> str:
    if not paths:
        return ""
    parents = [str(Path(p).parent) for p in paths]
    try:
        root = Path(os.path.commonpath(parents))
    except ValueError:  # mixed drives / relative and absolute
        return ""
    # MVTec layout: <root>/train/good, <root>/test/<class>: report paths relative to <root>.
    while root.name in {"train", "test", "ground_truth"} or root.parent.name in {"train", "test"}:
        root = root.parent
    return str(root)


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
    `data_docs_dir`, Data Docs HTML are built there and `statistics["data_docs"]` is its
    index.html.
    """
    import great_expectations as gx

    paths = suite_paths(cfg_validation)
    path = paths[0]
    parameters = _suite_parameters(cfg_validation, len(facts))
    suite = load_suite(path, parameters, paths[1:])

    table = facts.reset_index(drop=True).copy()
    table["split"] = table["split"].fillna("").astype(str) if "split" in table else ""
    _add_copy_counts(table)
    counts = {str(k): int(v) for k, v in (class_counts or {}).items()}
    if "label" in table:
        observed = table["label"].value_counts().to_dict()
        counts = {**{str(k): int(v) for k, v in observed.items()}, **counts}
        table["class_image_count"] = table["label"].map(counts).astype("Int64")
    if facts_csv is not None:  # the exact table the suite checks, for people and later runs
        Path(facts_csv).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(facts_csv, index=False)

    if data_docs_dir is not None:
        data_docs_dir = Path(data_docs_dir).resolve()
        data_docs_dir.mkdir(parents=True, exist_ok=True)
    context = _context(data_docs_dir)
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

    root = _dataset_root([str(p) for p in table.get("path", [])])
    records = table.to_dict("records") if "path" in table else []
    copies: dict[str, list[dict]] = {}
    for record in records:
        if isinstance(record.get("sha256"), str):
            copies.setdefault(record["sha256"], []).append(record)
    ctx = _Context(
        rows={r["path"]: r for r in records},
        copies={k: v for k, v in copies.items() if len(v) > 1},
        root=root,
    )
    failures = [_failure(r, ctx) for r in suite_result.results if not r.success]
    # A class named in class_counts with no image at all has no row to fail on.
    minimum = parameters["min_images_per_class"]
    present = set(table["label"]) if "label" in table else set()
    empty = sorted(c for c, n in counts.items() if c not in present and n < minimum)
    if empty:
        failures.append(
            {
                "expectation": "min_images_per_class",
                "column": "label",
                "kwargs": {"min_value": minimum},
                "notes": f"Every class has at least {minimum} images",
                "unexpected_count": len(empty),
                "element_count": len(counts),
                "examples": [""] * len(empty[:MAX_EXAMPLES]),
                "values": [counts[c] for c in empty[:MAX_EXAMPLES]],
                "reasons": [f"class {c!r} has {counts[c]} images" for c in empty[:MAX_EXAMPLES]],
                "exception": None,
                "unit": "class",
            }
        )

    statistics = {
        **_plain(dict(suite_result.statistics)),
        "suite": str(path),
        "suites": [str(p) for p in paths],
        "suite_name": suite.name,
        "images": len(table),
        "unreadable": int((~table["readable"]).sum()) if "readable" in table else 0,
        "class_counts": dict(sorted(counts.items())),
        "root": root,
        "splits": {k: int(v) for k, v in sorted(table["split"].value_counts().items()) if k},
        "parameters": parameters,
    }
    if data_docs_dir is not None:
        # Renders the suite page (with the notes) and this run's result page: the checkpoint
        # keeps its result in the context's in-memory store, so no UpdateDataDocsAction needed.
        context.build_data_docs()
        make_offline(data_docs_dir)  # the pages' scripts and styles from the site itself
        statistics["data_docs"] = str(data_docs_dir / "index.html")
    return ValidationResult(
        success=bool(suite_result.success) and not empty,
        statistics=statistics,
        failures=failures,
    )
