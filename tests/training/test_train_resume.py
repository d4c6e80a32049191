"""A training run killed with SIGKILL resumes from its last checkpoint when started again on
the same run folder (what `defectflow train --run-id ID` does), and ends exactly as a run that
was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from helpers_processes import REPO_ROOT

EPOCHS = 30
SCRIPT = """
import json, sys
from pathlib import Path
from defectflow.config import load_config
from defectflow.data.mvtec import class_names, scan_dataset
from defectflow.data.split import select, stratified_split
from defectflow.training.train import PreparedData, save_artifact, train

root, run_dir = sys.argv[1], Path(sys.argv[2])
cfg = load_config("tiny", [f"data.root={root}", "train.epochs=EPOCHS", "train.frozen_epochs=0",
                           "train.early_stopping_patience=1000", "train.verbose=0"])
samples = scan_dataset(root)
rows = stratified_split(samples, 0.5, 0.25, 0.25, seed=0)
data = PreparedData(select(rows, "train"), select(rows, "val"), class_names(samples))
result = train(cfg, data, run_dir)
save_artifact(result, cfg, data.classes, run_dir / "model")
""".replace("EPOCHS", str(EPOCHS))


def _start(tiny_dataset, run_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tiny_dataset), str(run_dir)],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _epochs_saved(run_dir) -> int:
    meta = run_dir / "checkpoints" / "phase2" / "training_metadata.json"
    try:
        return int(json.loads(meta.read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0  # absent, or caught mid-write


def _arrays(weights_file) -> dict[str, np.ndarray]:
    """Every array of a Keras .weights.h5 file (layers and optimizer) by its path in the file."""
    import h5py

    arrays = {}
    with h5py.File(weights_file, "r") as f:
        f.visititems(
            lambda name, obj: (
                arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return arrays


def _model_weights(model_dir) -> list[np.ndarray]:
    import keras

    import defectflow.models.layers  # noqa: F401 - registers the custom layers the model names
    from defectflow.artifacts import MODEL_FILE

    return keras.saving.load_model(model_dir / MODEL_FILE, compile=False).get_weights()


def test_sigkilled_training_resumes_from_its_last_checkpoint(tiny_dataset, tmp_path):
    """Killed after epoch 3 or later, then started again: it trains only the remaining epochs
    and its weights are those of an uninterrupted run with the same seed and config.

    Equal with tolerance 0, not merely close: train.deterministic=true makes TensorFlow's ops
    deterministic on this CPU (two uninterrupted runs give the same bits), and every random
    draw of an epoch (shuffle, augmentation, dropout) depends only on (train.seed, epoch), so a
    resumed epoch computes exactly what the uninterrupted one did, from the same weights and
    optimizer state (BackupAndRestore). Any tolerance would hide a resume that restored state
    only approximately: a missing RNG state changed weights by up to 0.44 after 4 epochs here.
    """
    uninterrupted_dir = tmp_path / "uninterrupted"
    uninterrupted = _start(tiny_dataset, uninterrupted_dir)
    out, _ = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, out.decode()[-3000:]

    run_dir = tmp_path / "run"
    proc = _start(tiny_dataset, run_dir)
    deadline = time.monotonic() + 240
    while _epochs_saved(run_dir) < 3:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _epochs_saved(run_dir)
    assert 3 <= killed_at < EPOCHS, "the run finished before it could be killed"
    assert not (run_dir / "model").exists()

    again = _start(tiny_dataset, run_dir)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out.decode()[-3000:]
    record = json.loads((run_dir / "model" / "training.json").read_text())
    # Resumed after (at least) the epoch saved when it was killed, not from scratch: the
    # second attempt ran only the remaining epochs.
    assert record["resumed_from_epoch"] >= killed_at
    assert record["epochs_trained"] == EPOCHS - record["resumed_from_epoch"]
    # The history still covers the whole run, both attempts, each epoch once.
    assert len(record["history"]["loss"]) == EPOCHS
    assert np.isfinite(record["history"]["loss"]).all()
    assert record["best_epoch"] is not None and 1 <= record["best_epoch"] <= EPOCHS

    # As if never interrupted: the final weights and optimizer state, every epoch's figures,
    # the best epoch and the saved model (the best epoch's weights), all bit for bit.
    final = _arrays(run_dir / "checkpoints" / "phase2.done.weights.h5")
    expected = _arrays(uninterrupted_dir / "checkpoints" / "phase2.done.weights.h5")
    assert sorted(final) == sorted(expected) and any(k.startswith("optimizer/") for k in final)
    differing = {
        k: float(np.max(np.abs(final[k] - expected[k]), initial=0.0))
        for k in final
        if not np.allclose(final[k], expected[k], rtol=0, atol=0)
    }
    largest = sorted(differing.items(), key=lambda kv: -kv[1])[:5]
    assert not differing, (
        f"resumed at epoch {record['resumed_from_epoch']}: {len(differing)} of {len(final)} "
        f"arrays differ, the most: {largest}"
    )
    reference = json.loads((uninterrupted_dir / "model" / "training.json").read_text())
    assert record["history"] == reference["history"]
    assert (record["best_epoch"], record["best_score"]) == (
        reference["best_epoch"],
        reference["best_score"],
    )
    saved, saved_reference = (
        _model_weights(run_dir / "model"),
        _model_weights(uninterrupted_dir / "model"),
    )
    assert len(saved) == len(saved_reference)
    assert all(
        np.allclose(a, b, rtol=0, atol=0) for a, b in zip(saved, saved_reference, strict=True)
    )


def test_a_resumed_first_phase_does_not_shift_the_second(tiny_dataset, tmp_path):
    """Keras' BackupAndRestore leaves the epoch it restored on the model; the fine-tuning
    phase after a resumed frozen phase must still train only its own epochs."""
    from defectflow.config import load_config
    from defectflow.data.mvtec import class_names, scan_dataset
    from defectflow.data.split import select, stratified_split
    from defectflow.training.train import PreparedData, train

    samples = scan_dataset(tiny_dataset)
    rows = stratified_split(samples, 0.5, 0.25, 0.25, seed=0)
    data = PreparedData(select(rows, "train"), select(rows, "val"), class_names(samples))

    def config(epochs, frozen):
        return load_config(
            "tiny",
            [
                f"data.root={tiny_dataset}",
                "model.backbone=lite0",
                "model.input_size=32",
                f"train.epochs={epochs}",
                f"train.frozen_epochs={frozen}",
                "train.early_stopping_patience=1000",
                "train.verbose=0",
            ],
        )

    run_dir = tmp_path / "run"
    train(config(1, 1), data, run_dir)  # one frozen epoch checkpointed
    (
        run_dir / "checkpoints" / "phase1.done.weights.h5"
    ).unlink()  # as if killed before the phase ended
    result = train(config(3, 2), data, run_dir)  # resumes the frozen phase after its first epoch
    assert result.resumed_from_epoch == 1
    assert result.epochs_trained == 2  # frozen epoch 2, then fine-tuning epoch 3: nothing repeated
    assert len(result.history["loss"]) == 3


def test_every_epoch_reseeds_the_augmentation_and_the_dropout(tiny_dataset):
    """The epoch's random generators are set from (seed, epoch): the same epoch gives the same
    states (what lets a resumed run repeat an epoch), another epoch other states."""
    from defectflow.config import load_config
    from defectflow.data.augment import JointAugmentation
    from defectflow.training.resume import EpochRandomness
    from defectflow.training.train import build_configured_model

    cfg = load_config("tiny", [f"data.root={tiny_dataset}"])
    randomness = EpochRandomness(
        cfg.train.seed, JointAugmentation(cfg.augment, seed=cfg.train.seed)
    )
    callback = randomness.callback(build_configured_model(cfg, 6))

    def states(epoch: int) -> list[list[int]]:
        callback.on_epoch_begin(epoch)
        assert int(randomness.epoch.numpy()) == epoch
        return [np.asarray(g.state.numpy()).tolist() for g in callback.generators]

    first = states(0)
    # flip, rotation, translation, zoom, brightness, contrast, the per-sample draws; the dropout
    assert len(randomness.augmentation.seed_generators()) == 7 and len(first) == 8
    assert len({tuple(s) for s in first}) == len(first)
    assert states(1) != first
    assert states(0) == first
