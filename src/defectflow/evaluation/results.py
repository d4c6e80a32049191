"""Results over several runs of the same recipe (e.g. split seeds): mean ± std per metric."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from defectflow.artifacts import HEADLINE_METRICS

HEADLINE = tuple(HEADLINE_METRICS)

#: What the summary shows, in order, with the names a reader knows.
LABELS = HEADLINE_METRICS


def summarize(runs: list[dict]) -> dict:
    """`runs`: [{"seed": s, "metrics": {...}}, ...] -> {metric: {mean, std, min, max, values}}."""
    if not runs:
        raise ValueError("no runs to summarize")
    out = {}
    for key in HEADLINE:
        values = np.array([run["metrics"][key] for run in runs], dtype=np.float64)
        out[key] = {
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "min": float(values.min()),
            "max": float(values.max()),
            "values": values.tolist(),
        }
    return out


def markdown(runs: list[dict], summary: dict) -> str:
    seeds = [str(run["seed"]) for run in runs]
    lines = [
        f"| metric | mean ± std (n={len(runs)}) | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    for key, label in LABELS.items():
        row = summary[key]
        cells = " | ".join(f"{v:.3f}" for v in row["values"])
        lines.append(f"| {label} | {row['mean']:.3f} ± {row['std']:.3f} | {cells} |")
    return "\n".join(lines)


def pooled_confusion(runs: list[dict]) -> tuple[list[str], np.ndarray] | None:
    """The confusion matrices of all runs added up (rows: true class), when the runs carry them."""
    matrices = [np.asarray(run["confusion_matrix"]) for run in runs if "confusion_matrix" in run]
    if not matrices or len(matrices) != len(runs):
        return None
    return runs[0]["classes"], np.sum(matrices, axis=0)


def confusion_markdown(classes: list[str], matrix: np.ndarray) -> str:
    lines = ["| true \\ predicted | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    lines += [
        f"| {c} | " + " | ".join(str(int(v)) for v in row) + " |"
        for c, row in zip(classes, matrix, strict=True)
    ]
    return "\n".join(lines)


def write(runs: list[dict], out_dir: Path) -> dict:
    """results.json, results.csv (one row per run) and results.md in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs)
    (out_dir / "results.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["seed", *HEADLINE, "run_dir"])
        writer.writeheader()
        for run in runs:
            writer.writerow(
                {
                    "seed": run["seed"],
                    **{k: run["metrics"][k] for k in HEADLINE},
                    "run_dir": run.get("run_dir", ""),
                }
            )
    text = markdown(runs, summary)
    pooled = pooled_confusion(runs)
    if pooled:
        text += "\n\nConfusion matrix, test splits of all runs added up:\n\n" + confusion_markdown(
            *pooled
        )
    (out_dir / "results.md").write_text(text + "\n")
    return summary
