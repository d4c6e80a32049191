"""Results over several runs of the same recipe (e.g. split seeds): mean ± std per metric, the
wall time of each stage per run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from defectflow.artifacts import HEADLINE_METRICS

HEADLINE = tuple(HEADLINE_METRICS)

#: How many answers are accepted without a person, and how right those are: the test split's
#: figures at the confidence threshold calibration chose on validation (the lowest reaching
#: eval.accept_target_accuracy there; see `defectflow.evaluation.evaluate`).
SELECTIVE_METRICS = {
    "coverage": "answers accepted without review (coverage)",
    "accepted_accuracy": "accuracy of the accepted answers",
}

#: What the summary shows, in order, with the names a reader knows.
LABELS = {**HEADLINE_METRICS, **SELECTIVE_METRICS}

#: The evaluation's own file in a run folder, where the full test-split figures are.
RUN_METRICS = Path("evaluation") / "metrics.json"


def with_test_figures(runs: list[dict]) -> list[dict]:
    """Each run with its coverage, accepted accuracy, accept target, classes and confusion
    matrix added from its run folder's evaluation (what the flow's headline leaves out)."""
    out = []
    for run in runs:
        metrics = json.loads((Path(run["run_dir"]) / RUN_METRICS).read_text())
        kept = {
            k: metrics[k] for k in (*SELECTIVE_METRICS, "accept_target_accuracy") if k in metrics
        }
        out.append(
            {
                **run,
                "metrics": {**run["metrics"], **kept},
                "classes": metrics["classes"],
                "confusion_matrix": metrics["confusion_matrix"],
            }
        )
    return out


def summarize(runs: list[dict]) -> dict:
    """`runs`: [{"seed": s, "metrics": {...}}, ...] -> {metric: {mean, std, min, max, values, n}},
    for every metric of `LABELS` that each run has (runs recorded before coverage was kept
    lack it). A run's figure may be undefined (NaN: the accuracy of the accepted answers of a
    run that accepted none); mean, std, min and max are over the `n` runs where it is defined,
    NaN when none is."""
    if not runs:
        raise ValueError("no runs to summarize")
    out = {}
    for key in LABELS:
        if not all(key in run["metrics"] for run in runs):
            continue
        values = np.array([run["metrics"][key] for run in runs], dtype=np.float64)
        defined = values[np.isfinite(values)]
        if defined.size:
            spread = float(defined.std(ddof=1)) if defined.size > 1 else 0.0
            stats = (float(defined.mean()), spread, float(defined.min()), float(defined.max()))
        else:
            stats = (float("nan"),) * 4
        out[key] = {
            **dict(zip(("mean", "std", "min", "max"), stats, strict=True)),
            "values": values.tolist(),
            "n": int(defined.size),
        }
    return out


def format_figure(value: float) -> str:
    """A figure to three places; "—" where it is undefined (NaN)."""
    return "—" if not math.isfinite(value) else f"{value:.3f}"


def mean_std(row: dict) -> str:
    """ "mean ± std" of a `summarize` row, saying over how many runs when some had no figure."""
    n, total = row["n"], len(row["values"])
    if n == 0:
        return f"— (none of the {total} runs has one)"
    text = f"{row['mean']:.3f} ± {row['std']:.3f}"
    return text if n == total else f"{text} (the {n} of {total} runs that have one)"


def accept_targets(runs: list[dict]) -> list[float]:
    """The accepted-accuracy targets the runs' confidence thresholds were chosen for."""
    return sorted(
        {
            float(run["metrics"]["accept_target_accuracy"])
            for run in runs
            if run["metrics"].get("accept_target_accuracy") is not None
        }
    )


def markdown(runs: list[dict], summary: dict) -> str:
    seeds = [str(run["seed"]) for run in runs]
    lines = [
        f"| metric | mean ± std (n={len(runs)}) | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    for key, label in LABELS.items():
        if key not in summary:
            continue
        row = summary[key]
        cells = " | ".join(format_figure(v) for v in row["values"])
        lines.append(f"| {label} | {mean_std(row)} | {cells} |")
    if "coverage" in summary:
        targets = accept_targets(runs)
        lines += [
            "",
            "Coverage: the share of test answers whose confidence reaches the threshold chosen on "
            "validation, the lowest that gives "
            + (" / ".join(f"{t:.2f}" for t in targets) if targets else "the target")
            + " accuracy on the answers it accepts there (`eval.accept_target_accuracy`; the most "
            "accurate one where none does); the other answers go to a person.",
        ]
    return "\n".join(lines)


def stage_seconds(runs: list[dict]) -> dict[str, list[float | None]] | None:
    """{stage: [seconds of each run, None where it has no such stage]}, stages in the order they
    ended; None when the runs carry no stage times (recorded before they were kept)."""
    if not any(run.get("stage_seconds") for run in runs):
        return None
    stages: list[str] = []
    for run in runs:
        stages += [s for s in run.get("stage_seconds") or {} if s not in stages]
    return {s: [(run.get("stage_seconds") or {}).get(s) for run in runs] for s in stages}


def stage_markdown(runs: list[dict]) -> str | None:
    """Wall seconds of each stage per run and over all runs, in a Markdown table; None
    without stage times."""
    stages = stage_seconds(runs)
    if stages is None:
        return None

    def cell(value: float | None) -> str:
        return "—" if value is None else f"{value:.1f}"

    def total(values: list[float | None]) -> float:
        return math.fsum(v for v in values if v is not None)

    seeds = [str(run["seed"]) for run in runs]
    lines = [
        "| stage (wall s) | " + " | ".join(f"seed {s}" for s in seeds) + " | all seeds |",
        "|---|" + "---:|" * (len(seeds) + 1),
    ]
    for stage, values in stages.items():
        lines.append(
            f"| {stage} | " + " | ".join(cell(v) for v in values) + f" | {cell(total(values))} |"
        )
    walls = [run.get("wall_seconds") for run in runs]
    lines.append(
        "| whole run (first start to last end) | "
        + " | ".join(cell(v) for v in walls)
        + f" | {cell(total(walls))} |"
    )
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


def full_markdown(runs: list[dict], summary: dict) -> str:
    """The figures, the wall time per stage and the pooled confusion matrix, as far as the runs
    carry them: what results.md holds."""
    text = markdown(runs, summary)
    stages = stage_markdown(runs)
    if stages:
        text += "\n\nWall time of each stage, seconds:\n\n" + stages
    pooled = pooled_confusion(runs)
    if pooled:
        text += "\n\nConfusion matrix, test splits of all runs added up:\n\n" + confusion_markdown(
            *pooled
        )
    return text


def write(runs: list[dict], out_dir: Path) -> dict:
    """results.json, results.csv (one row per run) and results.md in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs)
    (out_dir / "results.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["seed", *summary, "wall_seconds", "run_dir"])
        writer.writeheader()
        for run in runs:
            writer.writerow(
                {
                    "seed": run["seed"],
                    **{k: run["metrics"][k] for k in summary},
                    "wall_seconds": run.get("wall_seconds", ""),
                    "run_dir": run.get("run_dir", ""),
                }
            )
    (out_dir / "results.md").write_text(full_markdown(runs, summary) + "\n")
    return summary
