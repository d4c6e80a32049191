"""The nightly retrain: the drift check of what production answered lately, then the full
training pipeline, only when the data changed since the production model was trained."""

from __future__ import annotations

from defectflow.orchestration.flows.training import training_pipeline
from defectflow.orchestration.tasks.data import fingerprint_data, load_config_only
from defectflow.orchestration.tasks.evaluation import check_drift
from defectflow.orchestration.tasks.packaging import production_data_version
from prefect import flow
from prefect.states import Completed

from defectflow.config import form_overrides


@flow(name="nightly-retrain", log_prints=True)
def nightly_retrain(
    config: str = "default",
    overrides: list[str] | None = None,
    data_root: str | None = None,
    tuner_trials: int | None = None,
    merge_reviewed: bool = True,
    force: bool = False,
):
    """Retrain on the current data when it differs from the production model's; the champion/challenger gate decides.

    Args:
        config: Name of a file in configs/ (without .yaml), layered over configs/default.yaml.
        overrides: Extra `key=value` settings applied last, e.g. train.epochs=3.
        data_root: Dataset folder in MVTec AD layout; empty keeps the config's data.root.
        tuner_trials: KerasTuner trials (tune.max_trials); 0 skips the search; empty keeps the config's.
        merge_reviewed: Add the reviewed images of the inbox (serve.inbox.incoming, MVTec layout) to the data.
        force: Retrain even when the data is unchanged.

    First, every night, the drift check (drift.*): production's answers of the last hours from
    the prediction log beside the production model's answers on its validation split (artifacts
    `drift` and `drift-checks`); it informs, it decides nothing. Unchanged data then ends the run
    Completed with "skipped: no new data". A failing retrain ends Failed and never touches the
    production model (promotion is the pipeline's last step).
    """
    reviewed = ["data.incoming=${serve.inbox.incoming}"] if merge_reviewed else []
    settings = form_overrides(data_root, tuner_trials, None, [*reviewed, *(overrides or [])])
    cfg = load_config_only(config, settings)
    drift = check_drift(cfg)
    data_version = fingerprint_data(cfg)
    production = production_data_version(cfg)
    if not force and production["data_version"] == data_version:
        return Completed(
            message=f"skipped: no new data (data version {data_version[:12]} is the one production "
            f"model {production['tag']} was trained on); drift check: {drift['headline']}",
            data={
                "skipped": True,
                "data_version": data_version,
                "production": production["tag"],
                "drift": drift,
            },
        )
    summary = training_pipeline(config=config, overrides=settings)  # a failure fails this run too
    return Completed(message=summary["decision"], data={**summary, "drift": drift})
