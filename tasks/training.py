"""Model tasks: hyper-parameter search and training."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections import deque
from pathlib import Path
from threading import Thread

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from defectflow.config import save_config
from defectflow.evaluation.plots import curves_image, save_rgb
from defectflow.orchestration.stage_times import TIMED
from defectflow.training import distributed_tuning as tuning
from defectflow.training.anomaly_fitting import fit_anomaly_head
from defectflow.training.train import PreparedData, save_artifact, train
from defectflow.training.tune import apply_hyperparameters, search_space, tune

#: After the chief has finished, how long a worker may take to exit before it is stopped (a
#: worker that reached the chief only after the search was over would wait an hour for it).
WORKER_GRACE_SECONDS = 60
#: Lines of a failed process's log quoted in the error.
LOG_TAIL_LINES = 40


@task(name="tune-hyperparameters", cache_policy=NONE, **TIMED)
def tune_hyperparameters(cfg, data: PreparedData, run_dir: Path, resume: bool = False) -> dict:
    """KerasTuner search; the best values, as {hyper-parameter: value}.

    tune.workers = 0 searches in this process; N > 0 runs KerasTuner's chief (the oracle) and
    N workers as processes, one `tuner-process` task each, and reads the chief's result.
    """
    if cfg.tune.workers > 0 and cfg.tune.enabled and search_space(cfg):
        best, trials = _tune_distributed(cfg, data, run_dir)
    else:
        best, trials = tune(cfg, data, run_dir, resume=resume)
    if trials:
        create_table_artifact(
            table=trials,
            key="tuner-trials",
            description=f"KerasTuner {cfg.tune.algorithm} search, best first "
            f"(objective {cfg.tune.objective}); CSV: {run_dir / 'trials.csv'}",
        )
        get_run_logger().info("best of %d trials: %s", len(trials), best)
    else:
        get_run_logger().info("tuning off: training with the configured values")
    return best


def _tune_distributed(cfg, data: PreparedData, run_dir: Path) -> tuple[dict, list[dict]]:
    """The chief and the workers as concurrent tasks; any one failing stops the others (a
    worker would otherwise wait for a dead chief, a chief for a dead worker's trial).

    A resumed run restarts a distributed search from scratch (`tuning.prepare` clears it):
    the trials of the interrupted attempt are not reused.
    """
    logger = get_run_logger()
    tuning_dir = tuning.prepare(cfg, data, run_dir)
    host = cfg.tune.oracle_host
    port = cfg.tune.oracle_port or tuning.free_port(host)
    stop_file = tuning_dir / "stop"
    roles = [tuning.CHIEF, *tuning.worker_ids(cfg.tune.workers)]
    logger.info("distributed search: chief on %s:%d, workers %s", host, port, ", ".join(roles[1:]))
    # A runner of its own, one thread per process: the flow's runner may have fewer threads
    # than this task (itself holding one) needs.
    with ThreadPoolTaskRunner(max_workers=len(roles)) as runner:
        futures = {
            role: runner.submit(
                run_tuner_process.with_options(task_run_name=f"tuner-{role}"),
                parameters={
                    "role": role,
                    "command": tuning.command(run_dir),
                    "env": tuning.tuner_env(role, host, port),
                    "log_file": tuning_dir / f"{role}.log",
                    "stop_file": stop_file,
                },
            )
            for role in roles
        }
        try:
            pending = set(futures.values())
            chief_done_at = None
            while pending:
                _, pending = wait(list(pending), timeout=2)
                states = {role: f.state for role, f in futures.items()}
                if not stop_file.exists() and any(
                    s.is_failed() or s.is_crashed() or s.is_cancelled() for s in states.values()
                ):
                    stop_file.write_text("failed")
                if chief_done_at is None and states[tuning.CHIEF].is_completed():
                    chief_done_at = time.monotonic()
                if (
                    chief_done_at
                    and pending
                    and not stop_file.exists()
                    and time.monotonic() - chief_done_at > WORKER_GRACE_SECONDS
                ):
                    stop_file.write_text("finished")
        finally:
            if not stop_file.exists() and any(not f.state.is_final() for f in futures.values()):
                stop_file.write_text("failed")  # this task is ending early: end the processes too
        failed = [role for role, f in futures.items() if not f.state.is_completed()]
        if failed:
            # The chief's error first: a worker failing after it is usually a consequence.
            futures[sorted(failed, key=lambda r: r != tuning.CHIEF)[0]].result()
    return tuning.read_result(tuning_dir / tuning.RESULT_FILE)


@task(name="tuner-process", cache_policy=NONE)
def run_tuner_process(
    role: str, command: list[str], env: dict[str, str], log_file: Path, stop_file: Path
) -> int:
    """One KerasTuner process (chief or worker): its output lines go to this task's log (and
    `log_file`); a non-zero exit fails the task with the tail of that log. It is killed when
    `stop_file` appears (another process failed) and whenever this task ends early."""
    logger = get_run_logger()
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as out:
        process = subprocess.Popen(
            command,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )

        def forward():
            for line in process.stdout:
                line = line.rstrip()
                out.write(line + "\n")
                out.flush()
                tail.append(line)
                logger.info("[%s] %s", role, line)

        reader = Thread(target=forward, name=f"tuner-{role}-output", daemon=True)
        reader.start()
        stopped = None
        try:
            while process.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=1)
                if process.poll() is None and stop_file.exists():
                    stopped = stop_file.read_text().strip() or "failed"
                    logger.warning(
                        "stopping %s (pid %d): %s",
                        role,
                        process.pid,
                        "the search is over"
                        if stopped == "finished"
                        else "another tuner process failed",
                    )
                    _stop(process)
        finally:
            _stop(
                process
            )  # this task ending early (an error, a timeout, a cancellation) ends its process
            reader.join(timeout=10)
    code = process.returncode
    if stopped == "finished":
        return code
    if stopped or code != 0:
        raise RuntimeError(
            f"tuner process {role} {'was stopped' if stopped else 'failed'} (exit code {code}); "
            f"last lines of {log_file}:\n" + "\n".join(tail)
        )
    return code


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@task(name="train-model", cache_policy=NONE, **TIMED)
def train_model(cfg, data: PreparedData, hyperparameters: dict, run_dir: Path) -> Path:
    """Two-phase training with the tuned values; resumes from the run's checkpoints."""
    tuned = apply_hyperparameters(cfg, hyperparameters)
    save_config(tuned, run_dir / "config.tuned.yaml")
    result = train(tuned, data, run_dir)
    model_dir = save_artifact(result, tuned, data.classes, run_dir / "model")
    save_rgb(
        curves_image(result.history, ["loss", "val_loss", "class_loss", "val_class_loss"]),
        run_dir / "training_curves.png",
    )
    if "val_score" in result.history:
        save_rgb(
            curves_image(result.history, ["val_score", "val_class_accuracy", "val_mask_dice"]),
            run_dir / "validation_curves.png",
        )
    get_run_logger().info(
        "trained on %s in %.1f s (best epoch %s by %s = %s%s); model %s",
        result.device,
        result.seconds,
        result.best_epoch,
        tuned.train.monitor,
        result.best_score,
        f", resumed after epoch {result.resumed_from_epoch}" if result.resumed_from_epoch else "",
        model_dir,
    )
    return model_dir


def _dims(record: dict) -> str:
    if record["projection_dims"]:
        return f"{record['feature_dims']} dims projected to {record['projection_dims']}"
    return f"{record['feature_dims']} dims"


@task(name="fit-anomaly-head", cache_policy=NONE, **TIMED)
def fit_anomaly_model(cfg, model_dir: Path, data: PreparedData) -> dict | None:
    """The anomaly score's memory bank, from the good training images, added to the model
    (its threshold is chosen with the others on the validation split)."""
    logger = get_run_logger()
    if not cfg.anomaly.enabled:
        logger.info("anomaly score off (anomaly.enabled=false): the classifier alone decides")
        return None
    good = [s for s in data.train_samples if s.label == data.classes[0]]
    record = fit_anomaly_head(
        model_dir,
        good,
        cfg.anomaly.bank_size,
        cfg.anomaly.projection_dims,
        cfg.anomaly.seed,
        cfg.train.batch_size,
    )
    logger.info(
        "anomaly memory bank: %d of %d patches of %d good training images, %s, %.1f s",
        record["bank_size"],
        record["patches"],
        record["train_images"],
        _dims(record),
        record["fit_seconds"],
    )
    return record
