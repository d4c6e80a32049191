"""Reproduce a result over several split seeds: tune once, train and evaluate on each split."""

from __future__ import annotations

import time
from pathlib import Path

from defectflow.orchestration.flows.training import training_pipeline
from defectflow.orchestration.tasks.evaluation import summarize_results
from prefect import flow

from defectflow.training.train import HYPERPARAMETER_KEYS

#: The model name a reproduce study registers its runs under (never promoted: no champion).
STUDY_MODEL_NAME = "reproduce-study"


@flow(name="reproduce", log_prints=True)
def reproduce(
    config: str = "default",
    seeds: list[int] | None = None,
    overrides: list[str] | None = None,
    out_dir: str | None = None,
) -> dict:
    """The training pipeline on each split seed. The first seed's run tunes (on its own
    validation split, never on test data); the others train with the values it chose.

    Args:
        config: name of a file in configs/; the default recipe unless a study needs another.
        seeds: values of data.split.seed, one run each.
        overrides: `key=value` pairs for every run.
        out_dir: where results.{md,csv,json} go (default: <paths.home>/results/<config>-<time>).
    """
    seeds = list(seeds or [42, 43, 44])
    # A study of the recipe, not a release: models are registered as candidates, never promoted,
    # under a name of their own. Under the production model's name that model, trained on
    # another split of the same images, would be the champion, and the test images it trained
    # on would leave every seed's test split (all of them, on a small data set).
    base = [
        *(overrides or []),
        "package.build_bento=false",
        "gate.promote=false",
        f"package.model_name={STUDY_MODEL_NAME}",
    ]
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
        runs.append(
            {
                "seed": seed,
                "metrics": summary["metrics"],
                "run_dir": summary["run_dir"],
                "stage_seconds": summary["stage_seconds"],
                "wall_seconds": summary["wall_seconds"],
            }
        )
    target = (
        Path(out_dir)
        if out_dir
        else Path(runs[0]["run_dir"]).parents[1]
        / "results"
        / (f"{config}-" + time.strftime("%Y%m%d-%H%M%S"))
    )
    summary = summarize_results(runs, target)
    return {"out_dir": str(target), "tuned": tuned, "runs": runs, "summary": summary}
