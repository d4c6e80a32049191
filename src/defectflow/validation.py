"""Data validation: facts about every image, checked by a Great Expectations suite.

`image_facts` opens every image (and its mask) once and writes down what training relies on:
readable, size, channels, pixel type, mask present / same size / binary / not empty. The checks
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from defectflow.config import REPO_ROOT
from defectflow.data.mvtec import Sample

# Set before great_expectations is first imported (it is imported lazily: it takes seconds).
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

#: How many failing files a failure keeps (and the message names) per check.
MAX_EXAMPLES = 5

FACT_COLUMNS = [
    "path",
    "label",
    "origin",
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
    "mask_area_fraction",
    "sha256",
]
_INT_COLUMNS = ["height", "width", "channels", "mask_height", "mask_width"]
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


def _fact_row(sample: Sample, good_class: str) -> dict[str, Any]:
    path = Path(sample.path)
    data, image, error = _read(path)
    row: dict[str, Any] = {
        "path": str(path),
        "label": sample.label,
        "origin": sample.origin,
        "readable": image is not None,
        "error": error,
        "height": None,
        "width": None,
        "channels": None,
        "dtype": None,
        "has_mask": False,
        "mask_required": sample.label != good_class,
        "mask_path": None,
        "mask_readable": False,
        "mask_height": None,
        "mask_width": None,
        "mask_same_size": False,
        "mask_binary": False,
        "mask_area_fraction": float("nan"),
        "sha256": hashlib.sha256(data).hexdigest() if data else None,
    }
    if image is not None:
        row.update(
            height=int(image.shape[0]),
            width=int(image.shape[1]),
            channels=1 if image.ndim == 2 else int(image.shape[2]),
            dtype=str(image.dtype),
        )
    mask_path = Path(sample.mask_path) if sample.mask_path is not None else None
    if mask_path is None or not mask_path.is_file():
        return row
    row.update(has_mask=True, mask_path=str(mask_path))
    _, mask, mask_error = _read(mask_path)
    if mask is None:
        row["error"] = "; ".join(e for e in (error, f"mask {mask_path.name}: {mask_error}") if e)
        return row
    if mask.ndim == 3:  # a colour-saved mask: any non-zero channel is defect
        mask = mask.max(axis=2)
    values = np.unique(mask)
    row.update(
        mask_readable=True,
        mask_height=int(mask.shape[0]),
        mask_width=int(mask.shape[1]),
        mask_same_size=image is not None and mask.shape[:2] == image.shape[:2],
        mask_binary=len(values) <= 1 or (len(values) == 2 and values[0] == 0),
        mask_area_fraction=float(np.count_nonzero(mask)) / mask.size,
    )
    return row


def image_facts(samples: list[Sample], good_class: str = "good") -> pd.DataFrame:
    """One row per image with everything the validation suite checks. Never raises on bad files."""
    frame = pd.DataFrame([_fact_row(s, good_class) for s in samples], columns=FACT_COLUMNS)
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
        root = self._root()
        if root and path.startswith(root):
            return Path(os.path.relpath(path, root)).as_posix()
        return path

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
            unit = "image" if count == 1 else "images"
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


def require_valid(result: ValidationResult) -> ValidationResult:
    if not result.success:
        raise DataValidationError(result.message())
    return result


# ---------------------------------------------------------------------------------------------
# Running the suite


def suite_path(cfg_validation) -> Path:
    path = Path(cfg_validation.suite).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def _suite_parameters(cfg_validation) -> dict[str, Any]:
    return {
        "min_side": int(cfg_validation.min_side),
        "max_side": int(cfg_validation.max_side),
        "allowed_channels": [int(c) for c in cfg_validation.allowed_channels],
        "min_images_per_class": int(cfg_validation.min_images_per_class),
    }


def _referenced_parameters(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$PARAMETER"]} if "$PARAMETER" in node else set()
        return found.union(*(_referenced_parameters(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_referenced_parameters(v) for v in node))
    return set()


def load_suite(path: Path, parameters: dict[str, Any]):
    """The JSON suite as a gx.ExpectationSuite; fails loudly on any invalid expectation."""
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot load the expectation suite {path}: {exc}") from exc
    missing = _referenced_parameters(spec) - set(parameters)
    if missing:
        raise ValueError(
            f"{path} uses suite parameters with no value: {', '.join(sorted(missing))}"
        )
    spec = copy.deepcopy(spec)
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


def _reason(column: str | None, entry: dict, rows: dict[str, dict]) -> str:
    row = rows.get(entry.get("path"), {})
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
    if column in entry:
        return f"{column}={_plain(entry[column])}"
    return ""


def _failure(result, rows: dict[str, dict]) -> dict:
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
    if column == "class_image_count" and entries:
        # One example per class, not per image: the class is what is short of images.
        by_class: dict[str, int] = {}
        for e in entries:
            by_class.setdefault(str(e.get("label")), int(e.get(column) or 0))
        for label, count in list(by_class.items())[:MAX_EXAMPLES]:
            failure["examples"].append("")
            failure["values"].append(count)
            failure["reasons"].append(f"class {label!r} has {count} images")
        failure["unexpected_count"] = len(by_class)
        return failure
    for e in entries[:MAX_EXAMPLES]:
        failure["examples"].append(str(e.get("path", "")))
        failure["values"].append(_plain(e.get(column)) if column else None)
        failure["reasons"].append(_reason(column, e, rows))
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


def validate_dataset(
    facts: pd.DataFrame,
    cfg_validation,
    class_counts: dict[str, int] | None = None,
    data_docs_dir: Path | None = None,
) -> ValidationResult:
    """Run the JSON suite (`cfg_validation.suite`) on the facts table.

    `class_counts` (class -> number of images) defaults to the counts of `facts.label`; it fills
    the `class_image_count` column the per-class minimum is checked on. With `data_docs_dir`,
    Data Docs HTML are built there and `statistics["data_docs"]` is its index.html.
    """
    import great_expectations as gx

    path = suite_path(cfg_validation)
    parameters = _suite_parameters(cfg_validation)
    suite = load_suite(path, parameters)

    table = facts.reset_index(drop=True).copy()
    counts = {str(k): int(v) for k, v in (class_counts or {}).items()}
    if "label" in table:
        observed = table["label"].value_counts().to_dict()
        counts = {**{str(k): int(v) for k, v in observed.items()}, **counts}
        table["class_image_count"] = table["label"].map(counts).astype("Int64")

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

    rows = {r["path"]: r for r in table.to_dict("records")} if "path" in table else {}
    failures = [_failure(r, rows) for r in suite_result.results if not r.success]
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
            }
        )

    statistics = {
        **_plain(dict(suite_result.statistics)),
        "suite": str(path),
        "suite_name": suite.name,
        "images": len(table),
        "unreadable": int((~table["readable"]).sum()) if "readable" in table else 0,
        "class_counts": dict(sorted(counts.items())),
        "root": _dataset_root([str(p) for p in table.get("path", [])]),
        "parameters": parameters,
    }
    if data_docs_dir is not None:
        # Renders the suite page (with the notes) and this run's result page: the checkpoint
        # keeps its result in the context's in-memory store, so no UpdateDataDocsAction needed.
        context.build_data_docs()
        statistics["data_docs"] = str(data_docs_dir / "index.html")
    return ValidationResult(
        success=bool(suite_result.success) and not empty,
        statistics=statistics,
        failures=failures,
    )
