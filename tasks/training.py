"""Model tasks: hyper-parameter search and training."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from defectflow.config import save_config
from defectflow.plots import curves_image, save_rgb
from defectflow.training import PreparedData, apply_hyperparameters, save_artifact, train, tune


@task(name="tune-hyperparameters", cache_policy=NONE)
def tune_hyperparameters(cfg, data: PreparedData, run_dir: Path, resume: bool = False) -> dict:
    """KerasTuner search; the best values, as {hyper-parameter: value}."""
    best, trials = tune(cfg, data, run_dir, resume=resume)
    if trials:
        create_table_artifact(table=trials, key="tuner-trials",
                              description=f"KerasTuner {cfg.tune.algorithm} search, best first "
                                          f"(objective {cfg.tune.objective}); CSV: {run_dir / 'trials.csv'}")
        get_run_logger().info("best of %d trials: %s", len(trials), best)
    else:
        get_run_logger().info("tuning off: training with the configured values")
    return best


@task(name="train-model", cache_policy=NONE)
def train_model(cfg, data: PreparedData, hyperparameters: dict, run_dir: Path) -> Path:
    """Two-phase training with the tuned values; resumes from the run's checkpoints."""
    tuned = apply_hyperparameters(cfg, hyperparameters)
    save_config(tuned, run_dir / "config.tuned.yaml")
    result = train(tuned, data, run_dir)
    model_dir = save_artifact(result, tuned, data.classes, run_dir / "model")
    save_rgb(curves_image(result.history, ["loss", "val_loss", "class_loss", "val_class_loss"]),
             run_dir / "training_curves.png")
    if "val_score" in result.history:
        save_rgb(curves_image(result.history, ["val_score", "val_class_accuracy", "val_mask_dice"]),
                 run_dir / "validation_curves.png")
    get_run_logger().info(
        "trained on %s in %.1f s (best epoch %s by %s = %s%s); model %s", result.device, result.seconds,
        result.best_epoch, tuned.train.monitor, result.best_score,
        f", resumed after epoch {result.resumed_from_epoch}" if result.resumed_from_epoch else "", model_dir,
    )
    return model_dir
