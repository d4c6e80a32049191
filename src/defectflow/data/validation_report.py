"""What a data validation run says: each failed check in plain words, and the result's text.

`failure_summaries` turns the failed expectation results of a Great Expectations run into dicts
that name the failing files and why each failed (a mask of another size, the same bytes as a
file in another split, ...); `ValidationResult` holds them with the run's statistics and
writes the error message (`message`) and the Markdown summary (`summary_markdown`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: How many failing files a failure keeps (and the message names) per check.
MAX_EXAMPLES = 5


def plain(value: Any) -> Any:
    """numpy / pandas scalars to JSON-able Python values."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
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


def relative(path: str, root: str) -> str:
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
        relative(r["path"], ctx.root) + (f" in {r['split']}" if r.get("split") else "")
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
        mask = relative(str(row.get("mask_path") or ""), ctx.root)
        return f"good image with a mask marking {row.get('good_mask_area')} defect pixels: {mask}"
    if column == "sha256_split_count":
        return _copies_text(row, ctx, same_split=False)
    if column == "sha256_count_in_split":
        return _copies_text(row, ctx, same_split=True)
    if column == "label":
        return f"class {row.get('label', entry.get('label'))!r} is not expected"
    if column in entry:
        return f"{column}={plain(entry[column])}"
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
        "kwargs": plain(kwargs),
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
                relative(str(e.get("path", "")), ctx.root)
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
        failure["values"].append(plain(e.get(column)) if column else None)
        failure["reasons"].append(_reason(column, e, ctx))
    if not entries and failure["unexpected_count"] == 0 and not failure["exception"]:
        observed = details.get("observed_value")
        if observed is not None:
            failure["reasons"].append(f"observed {plain(observed)}")
            failure["examples"].append("")
    return failure


def dataset_root(paths: list[str]) -> str:
    """The dataset folder the files are named relative to in the failures and messages."""
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


def failure_summaries(suite_result, table: pd.DataFrame, root: str) -> list[dict]:
    """One dict per failed expectation of `suite_result` (see `ValidationResult.failures`),
    its reasons looked up in `table` (the table the suite checked), its files named relative
    to `root`."""
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
    return [_failure(r, ctx) for r in suite_result.results if not r.success]


def empty_classes_failure(counts: dict[str, int], table: pd.DataFrame, minimum: int) -> dict | None:
    """The failure for the classes named in `counts` with fewer than `minimum` images and none
    in `table` (so no row for the suite to fail on); None when there are none."""
    present = set(table["label"]) if "label" in table else set()
    empty = sorted(c for c, n in counts.items() if c not in present and n < minimum)
    if not empty:
        return None
    return {
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
        return relative(path, self._root())

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
