"""Model tasks: hyper-parameter search and training."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from defectflow.plots import curves_image, save_rgb
from defectflow.training import PreparedData, save_artifact, train, tune


@task(name="tune-hyperparameters", cache_policy=NONE)
def tune_hyperparameters(cfg, data: PreparedData, run_dir: Path) -> dict:
    best, trials = tune(cfg, data, run_dir)
    if trials:
        create_table_artifact(table=trials, key="tuner-trials", description="KerasTuner trials, best first")
    get_run_logger().info("best hyper-parameters %s (%d trials)", best, len(trials))
    return best


@task(name="train-model", cache_policy=NONE)
def train_model(cfg, data: PreparedData, hyperparameters: dict, run_dir: Path) -> Path:
    result = train(cfg, data, hyperparameters)
    model_dir = save_artifact(result, cfg, data.classes, run_dir / "model")
    save_rgb(curves_image(result.history, ["loss", "val_loss", "class_loss", "val_class_loss"]),
             run_dir / "training_curves.png")
    get_run_logger().info("trained on %s in %.1f s; model %s", result.device, result.seconds, model_dir)
    return model_dir
