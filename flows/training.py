"""The training pipeline: scan, split, validate, augment, tune, train, calibrate, evaluate, gate, package."""

from __future__ import annotations

from prefect import flow

from tasks.data import augment_data, load_run_config, scan_data, split_data, validate_data
from tasks.evaluation import apply_gate, calibrate_thresholds, evaluate_model
from tasks.packaging import package_model
from tasks.training import train_model, tune_hyperparameters


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(config: str = "default", overrides: list[str] | None = None, run_id: str | None = None) -> dict:
    """Train, evaluate and package a defect model.

    Args:
        config: name of a file in configs/ (without .yaml) layered over configs/default.yaml.
        overrides: `key=value` pairs applied last, e.g. ["train.epochs=3"].
        run_id: name of the run folder; the id of an unfinished run resumes it.
    """
    cfg, run_dir, resumed = load_run_config(config, list(overrides or []), run_id)
    samples, facts = scan_data(cfg, run_dir)
    split = split_data(cfg, samples, facts, run_dir)
    validate_data(cfg, samples, facts, split, run_dir)
    data = augment_data(cfg, samples, split, run_dir)
    hyperparameters = tune_hyperparameters(cfg, data, run_dir, resumed)
    model_dir = train_model(cfg, data, hyperparameters, run_dir)
    calibrate_thresholds(cfg, model_dir, split.rows, run_dir)
    evaluation = evaluate_model(cfg, model_dir, split.rows, run_dir)
    apply_gate(cfg, evaluation, run_dir)
    package = package_model(cfg, model_dir, evaluation, run_dir)
    return {
        "run_dir": str(run_dir),
        "data_fingerprint": split.fingerprint,
        "model_dir": str(model_dir),
        "hyperparameters": hyperparameters,
        "metrics": evaluation.headline(),
        **package,
    }


if __name__ == "__main__":
    training_pipeline()
