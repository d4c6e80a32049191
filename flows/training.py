"""The training pipeline: scan, split, validate, augment, tune, train, fit the anomaly score,
calibrate, export, evaluate challenger and champion, gate, register, promote, package, report,
and the wall time of each of those stages."""

from __future__ import annotations

from defectflow.orchestration.tasks.data import (
    augment_data,
    fingerprint_data,
    load_run_config,
    scan_data,
    split_data,
    validate_data,
)
from defectflow.orchestration.tasks.evaluation import (
    apply_gate,
    calibrate_thresholds,
    evaluate_champion,
    evaluate_model,
    guard_test_set,
    write_evaluation_report,
)
from defectflow.orchestration.tasks.export import export_compact_model
from defectflow.orchestration.tasks.packaging import promote_model, register_model
from defectflow.orchestration.tasks.runs import record_stage_times
from defectflow.orchestration.tasks.training import (
    fit_anomaly_model,
    train_model,
    tune_hyperparameters,
)
from prefect import flow
from prefect.states import Completed

from defectflow.config import form_overrides


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(
    config: str = "default",
    overrides: list[str] | None = None,
    data_root: str | None = None,
    tuner_trials: int | None = None,
    promote: bool = True,
    run_id: str | None = None,
):
    """Train a defect model and promote it to production only if it is not worse than production.

    Args:
        config: Name of a file in configs/ (without .yaml), layered over configs/default.yaml: default, demo, capsule, tiny.
        overrides: Extra `key=value` settings applied last, e.g. train.epochs=3 (see the table in docs/configuration.md).
        data_root: Dataset folder in MVTec AD layout; empty keeps the config's data.root.
        tuner_trials: KerasTuner trials (tune.max_trials); 0 skips the search; empty keeps the config's.
        promote: Make the new model production when it passes the gate; off keeps it a candidate.
        run_id: Name of the run folder; the id of an unfinished run resumes it. Empty starts a new run.

    A challenger the gate rejects ends the run Completed with a "not promoted: ..." message
    and production untouched; errors end it Failed.
    """
    cfg, run_dir, resumed = load_run_config(
        config, form_overrides(data_root, tuner_trials, promote, overrides), run_id
    )
    data_version = fingerprint_data(cfg)
    samples, facts = scan_data(cfg, data_version)
    split = split_data(cfg, samples, facts, run_dir)
    validate_data(cfg, samples, facts, split, data_version, run_dir)
    data = augment_data(cfg, samples, split, run_dir)
    hyperparameters = tune_hyperparameters(cfg, data, run_dir, resumed)
    model_dir = train_model(cfg, data, hyperparameters, run_dir)
    fit_anomaly_model(cfg, model_dir, data)
    calibrate_thresholds(cfg, model_dir, split.rows, run_dir)
    # Before evaluation, so the figures come from the format that will serve.
    compact = export_compact_model(cfg, model_dir, split.rows, run_dir)
    # The golden test split, without any file either model trained or validated on.
    test_set = guard_test_set(cfg, split.rows, run_dir)
    evaluation = evaluate_model(cfg, model_dir, test_set.rows, run_dir)
    champion = evaluate_champion(cfg, model_dir, test_set.rows, run_dir)
    decision = apply_gate(cfg, evaluation, champion, run_dir, test_set)
    model_tag = register_model(cfg, model_dir, evaluation, decision, split.fingerprint, run_dir)
    package = promote_model(cfg, model_tag, decision, run_dir)
    report = write_evaluation_report(cfg, evaluation, champion, decision, model_tag, run_dir)
    times = record_stage_times(run_dir)
    summary = {
        "run_dir": str(run_dir),
        "data_fingerprint": split.fingerprint,
        "model_dir": str(model_dir),
        "hyperparameters": hyperparameters,
        "metrics": evaluation.headline(),
        "serving_format": compact["format"],
        "champion": decision.champion,
        "report": report["html"],
        **package,
        **times,
    }
    return Completed(message=decision.message, data=summary)


if __name__ == "__main__":
    training_pipeline()
