"""Reproduce a result over several split seeds: tune once, train and evaluate on each split."""

from __future__ import annotations

import json
import time
from pathlib import Path

from defectflow.orchestration.flows.training import training_pipeline
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from defectflow.evaluation import results
from defectflow.training.train import HYPERPARAMETER_KEYS


@task(name="summarize-results", cache_policy=NONE)
def summarize_results(runs: list[dict], out_dir: Path) -> dict:
    for run in runs:  # the full figures of each run's test split, for the pooled confusion matrix
        metrics = json.loads((Path(run["run_dir"]) / "evaluation" / "metrics.json").read_text())
        run.update(confusion_matrix=metrics["confusion_matrix"], classes=metrics["classes"])
    summary = results.write(runs, out_dir)
    create_markdown_artifact(
        markdown=results.markdown(runs, summary),
        key="reproduce-results",
        description=f"mean ± std over split seeds; files in {out_dir}",
    )
    get_run_logger().info(
        "results over %d seeds:\n%s", len(runs), (out_dir / "results.md").read_text()
    )
    return summary


@flow(name="reproduce", log_prints=True)
def reproduce(
    config: str = "capsule",
    seeds: list[int] | None = None,
    overrides: list[str] | None = None,
    out_dir: str | None = None,
) -> dict:
    """The training pipeline on each split seed. The first seed's run tunes (on its own
    validation split, never on test data); the others train with the values it chose.

    Args:
        config: name of a file in configs/.
        seeds: values of data.split.seed, one run each.
        overrides: `key=value` pairs for every run.
        out_dir: where results.{md,csv,json} go (default: <paths.home>/results/<config>-<time>).
    """
    seeds = list(seeds or [42, 43, 44])
    # A study of the recipe, not a release: models are registered as candidates, never promoted.
    base = [*(overrides or []), "package.build_bento=false", "gate.promote=false"]
    runs, tuned = [], None
    for seed in seeds:
        extra = [f"data.split.seed={seed}"]
        if tuned is not None:
            extra += [
                "tune.enabled=false",
                *(f"{HYPERPARAMETER_KEYS[k]}={v}" for k, v in tuned.items()),
            ]
        summary = training_pipeline(config=config, overrides=[*base, *extra])
        tuned = summary["hyperparameters"] if tuned is None else tuned
        runs.append({"seed": seed, "metrics": summary["metrics"], "run_dir": summary["run_dir"]})
    target = (
        Path(out_dir)
        if out_dir
        else Path(runs[0]["run_dir"]).parents[1]
        / "results"
        / (f"{config}-" + time.strftime("%Y%m%d-%H%M%S"))
    )
    summary = summarize_results(runs, target)
    return {"out_dir": str(target), "tuned": tuned, "runs": runs, "summary": summary}
