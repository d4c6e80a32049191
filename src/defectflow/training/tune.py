"""Hyper-parameter search with KerasTuner over the training of `defectflow.training.train`.

`tune` runs the search of `cfg.tune` in this process, `build_tuner` is the one builder of the
tuner (also of the distributed search, `defectflow.training.distributed_tuning`), and the best
values are written back into a config with `apply_hyperparameters`. The tuner prints progress
per trial, so a long search is never silent.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from defectflow.models.unet import set_backbone_trainable
from defectflow.training.train import (
    HYPERPARAMETER_KEYS,
    PreparedData,
    build_configured_model,
    class_weights_of,
    compile_model,
    device_scope,
    monitor_mode,
    select_device,
    training_datasets,
    validation_score_callback,
)

log = logging.getLogger(__name__)


def apply_hyperparameters(cfg, values: dict):
    """A copy of `cfg` with tuner values written to their config keys."""
    unknown = set(values) - set(HYPERPARAMETER_KEYS)
    if unknown:
        raise KeyError(
            f"unknown hyper-parameters {sorted(unknown)}; known: {sorted(HYPERPARAMETER_KEYS)}"
        )
    out = copy.deepcopy(cfg)  # keeps the structured schema, so values are type-checked
    for name, value in values.items():
        OmegaConf.update(out, HYPERPARAMETER_KEYS[name], value, merge=False)
    return out


TUNER_CLASSES = {
    "grid": "GridSearch",
    "random": "RandomSearch",
    "hyperband": "Hyperband",
    "bayesian": "BayesianOptimization",
}


def search_space(cfg) -> dict[str, list]:
    """The searched hyper-parameters of `cfg.tune.space` and their choices (empty lists left out)."""
    return {name: list(values) for name, values in cfg.tune.space.items() if len(values)}


def build_tuner(cfg, data: PreparedData, directory: Path, overwrite: bool):
    """The KerasTuner tuner of `cfg.tune` over `search_space(cfg)`, its files in `directory`/tuner.

    The one builder of the single-process search (`tune`) and of the distributed one
    (`defectflow.training.distributed_tuning`): when the KERASTUNER_* environment variables are set, KerasTuner
    itself makes this tuner the chief (it serves the oracle) or a worker (it asks the chief
    for trials and reports their scores to it).
    """
    import keras
    import keras_tuner as kt

    space = search_space(cfg)
    num_classes = len(data.classes)
    objective = kt.Objective(cfg.tune.objective, direction=monitor_mode(cfg.tune.objective))

    class DefectHyperModel(kt.HyperModel):
        def _trial_config(self, hp):
            values = {
                name: hp.Choice(name, choices) if len(choices) > 1 else hp.Fixed(name, choices[0])
                for name, choices in space.items()
            }
            return apply_hyperparameters(cfg, values)

        def build(self, hp):
            trial_cfg = self._trial_config(hp)
            model = build_configured_model(trial_cfg, num_classes)
            set_backbone_trainable(model, False)
            return compile_model(
                model, trial_cfg, trial_cfg.train.learning_rate, class_weights_of(trial_cfg, data)
            )

        def fit(self, hp, model, *args, callbacks=(), **kwargs):
            trial_cfg = self._trial_config(hp)
            train_ds, val_ds, randomness = training_datasets(trial_cfg, data)
            callbacks = [
                randomness.callback(model),
                validation_score_callback(cfg.train.score_weights),
                *callbacks,
            ]
            return model.fit(train_ds, validation_data=val_ds, callbacks=callbacks, **kwargs)

    class DefectTuner(getattr(kt, TUNER_CLASSES[cfg.tune.algorithm])):
        """Remembers the trials this tuner process ran (a worker's share of a distributed search)."""

        def __init__(self, *args, **kwargs):
            self.trials_run: list[str] = []
            super().__init__(*args, **kwargs)

        def on_trial_end(self, trial):
            super().on_trial_end(trial)
            self.trials_run.append(trial.trial_id)
            log.info("tuner %s ended trial %s: %s", self.tuner_id, trial.trial_id, trial.status)

    options = {
        "objective": objective,
        "directory": str(directory),
        "project_name": "tuner",
        "overwrite": overwrite,
        "seed": cfg.tune.seed,
    }
    if cfg.tune.algorithm == "hyperband":
        options.update(max_epochs=cfg.tune.epochs, factor=cfg.tune.hyperband_factor)
    else:
        options.update(max_trials=cfg.tune.max_trials)
    keras.utils.set_random_seed(cfg.tune.seed)
    return DefectTuner(DefectHyperModel(), **options)


def run_search(tuner, cfg) -> None:
    """`tuner.search` on the configured device (on a distributed chief: serve the oracle until
    the workers are done)."""
    with device_scope(select_device(cfg.train.device)):
        search = {} if cfg.tune.algorithm == "hyperband" else {"epochs": cfg.tune.epochs}
        tuner.search(verbose=cfg.train.verbose, **search)


def search_results(tuner, cfg, out_dir: Path) -> tuple[dict, list[dict]]:
    """The best values and the trials table of a finished search (the oracle's, so only a
    single-process tuner or a distributed chief has them); writes trials.csv/json to `out_dir`."""
    trials = trials_table(tuner, cfg.tune.objective)
    if not trials:
        raise RuntimeError(
            "the tuner finished no trial; see the log above for the errors of each trial"
        )
    best = {
        name: value
        for name, value in tuner.get_best_hyperparameters(1)[0].values.items()
        if name in HYPERPARAMETER_KEYS
    }
    write_trials(trials, out_dir)
    return best, trials


def tune(cfg, data: PreparedData, out_dir: Path, resume: bool = False) -> tuple[dict, list[dict]]:
    """KerasTuner search over `cfg.tune.space` in this process; returns the best values and all
    trials. (`cfg.tune.workers` > 0 spreads it over processes: see `defectflow.training.distributed_tuning`.)

    Trials train the decoder and heads on the frozen encoder, the cheap and telling part;
    the best trial's values then configure the full two-phase training. A resumed run
    (`resume`) keeps the trials already finished.
    """
    if not cfg.tune.enabled:
        return {}, []
    if not search_space(cfg):
        log.warning(
            "tune.space is empty (tuner file %r): nothing to search, training with the configured values",
            cfg.tune.space_file,
        )
        return {}, []
    tuner = build_tuner(cfg, data, out_dir, overwrite=not resume)
    run_search(tuner, cfg)
    return search_results(tuner, cfg, out_dir)


def trials_table(tuner, objective: str) -> list[dict]:
    """One row per finished trial, best first: id, hyper-parameters, objective, epochs."""
    rows = []
    for trial in tuner.oracle.get_best_trials(num_trials=len(tuner.oracle.trials)):
        if trial.score is None:
            continue
        values = {k: v for k, v in trial.hyperparameters.values.items() if k in HYPERPARAMETER_KEYS}
        epochs = trial.hyperparameters.values.get("tuner/epochs")
        rows.append(
            {
                "trial": trial.trial_id,
                **values,
                objective: round(float(trial.score), 4),
                **({"epochs": epochs} if epochs else {}),
            }
        )
    return rows


def write_trials(trials: list[dict], out_dir: Path) -> Path:
    """trials.csv and trials.json in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in trials for key in row))
    with open(out_dir / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(trials)
    (out_dir / "trials.json").write_text(json.dumps(trials, indent=2))
    return out_dir / "trials.csv"
