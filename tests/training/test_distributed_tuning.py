"""Distributed hyper-parameter search: a KerasTuner chief and two workers as processes, started by
the Prefect task the training flow runs, against the single-process search on the same config."""

import csv
import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from defectflow.config import ConfigError, load_config
from defectflow.data.mvtec import class_names, scan_dataset
from defectflow.data.split import select, stratified_split
from defectflow.training.distributed_tuning import (
    ExchangeFileError,
    prepare,
    read_data,
    read_result,
    tuner_env,
)
from defectflow.training.train import PreparedData
from defectflow.training.tune import tune

SEARCH = ["tune.max_trials=2", "tune.epochs=1", "tune.space.base_filters=[4,8]", "train.verbose=2"]


def test_tune_workers_and_oracle_port_are_checked(tiny_dataset):
    cfg = load_config("tiny", [f"data.root={tiny_dataset}"])
    assert (cfg.tune.workers, cfg.tune.oracle_host, cfg.tune.oracle_port) == (0, "127.0.0.1", 0)
    assert load_config("tiny", ["tune.workers=3", "tune.oracle_port=65535"]).tune.workers == 3
    with pytest.raises(ConfigError, match="tune.workers must be >= 0"):
        load_config("tiny", ["tune.workers=-1"])
    for port in (-1, 65536):
        with pytest.raises(ConfigError, match="tune.oracle_port must be in 0..65535"):
            load_config("tiny", [f"tune.oracle_port={port}"])


def _run_code_when_unpickled(marker: Path, protocol: int) -> bytes:
    """A pickle whose loading creates `marker` (what a planted file on shared storage could do)."""

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    return pickle.dumps(Payload(), protocol=protocol)


def test_the_exchange_folder_holds_text_only_and_the_samples_round_trip(tiny_dataset, tmp_path):
    cfg = load_config("tiny", [f"data.root={tiny_dataset}"])
    data = _data(tiny_dataset)
    tuning = prepare(cfg, data, tmp_path)
    assert sorted(p.name for p in tuning.iterdir()) == ["config.yaml", "data.json"]
    assert json.loads((tuning / "data.json").read_text())["classes"] == data.classes
    back = read_data(tuning / "data.json")
    assert (back.train_samples, back.val_samples, back.classes) == (
        data.train_samples,
        data.val_samples,
        data.classes,
    )
    assert any(s.mask_path is not None for s in back.train_samples + back.val_samples)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_a_planted_pickle_is_rejected_without_running_it(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = _run_code_when_unpickled(marker, protocol)
    pickle.loads(payload)  # the payload is live: loading it is enough to run it
    assert marker.exists()
    marker.unlink()

    for name in ("data.json", "result.json"):
        (tmp_path / name).write_bytes(payload)
    complaint = "is a pickle" if protocol >= 2 else "not the tuning data file"
    with pytest.raises(ExchangeFileError, match=complaint):
        read_data(tmp_path / "data.json")
    with pytest.raises(ExchangeFileError, match="tuning result"):
        read_result(tmp_path / "result.json")
    assert not marker.exists()


def test_a_data_file_of_the_wrong_shape_is_rejected(tmp_path):
    path = tmp_path / "data.json"
    for doc, complaint in [
        ([], 'no "format"'),
        (
            {"format": "defectflow-tuning-samples/1", "classes": "good", "train": [], "val": []},
            '"classes" is not a list',
        ),
        (
            {
                "format": "defectflow-tuning-samples/1",
                "classes": ["good"],
                "train": [{"path": 1}],
                "val": [],
            },
            r"train\[0\] is not a sample",
        ),
    ]:
        path.write_text(json.dumps(doc))
        with pytest.raises(ExchangeFileError, match=complaint):
            read_data(path)


def test_a_tuner_process_refuses_a_planted_pickle(tiny_dataset, tmp_path):
    # The process end to end: it exits with the reason, and the pickle's code never ran.
    cfg = load_config("tiny", [f"data.root={tiny_dataset}"])
    tuning = prepare(cfg, _data(tiny_dataset), tmp_path)
    marker = tmp_path / "pwned"
    (tuning / "data.json").write_bytes(_run_code_when_unpickled(marker, 2))
    env = {**os.environ, **tuner_env("tuner0", "127.0.0.1", 1)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "defectflow.training.distributed_tuning",
            "--config",
            str(tuning / "config.yaml"),
            "--data",
            str(tuning / "data.json"),
            "--out",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "is a pickle" in done.stderr and "never loaded" in done.stderr
    assert not marker.exists()


def _data(dataset: Path) -> PreparedData:
    samples = scan_dataset(dataset)
    rows = stratified_split(samples, 0.5, 0.25, 0.25, seed=0)
    return PreparedData(select(rows, "train"), select(rows, "val"), class_names(samples))


def _search_flow():
    """A flow around the task alone, as the training flow calls it (config and data built inside:
    flow parameters must be JSON)."""
    from defectflow.orchestration.tasks.training import tune_hyperparameters
    from prefect import flow

    @flow(name="distributed-search-test")
    def search(dataset: str, overrides: list[str], run_dir: str) -> dict:
        cfg = load_config("tiny", [f"data.root={dataset}", *overrides])
        return tune_hyperparameters(cfg, _data(Path(dataset)), Path(run_dir))

    return search


@pytest.mark.integration
def test_chief_and_two_workers_give_the_single_process_result_shape(
    prefect_api, tiny_dataset, tmp_path
):
    run_dir = tmp_path / "distributed"
    started = time.monotonic()
    best = _search_flow()(str(tiny_dataset), [*SEARCH, "tune.workers=2"], str(run_dir))
    seconds = time.monotonic() - started

    # The chief's result, trials.csv/json, and the oracle's records of every trial.
    result = json.loads((run_dir / "tuning" / "result.json").read_text())
    assert result["best"] == best
    trials = result["trials"]
    assert len(trials) == 2 and {t["base_filters"] for t in trials} == {4, 8}
    assert json.loads((run_dir / "trials.json").read_text()) == trials
    with open(run_dir / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["trial"] for row in rows] == [t["trial"] for t in trials]
    for trial in trials:
        assert (run_dir / "tuner" / f"trial_{trial['trial']}" / "trial.json").exists()
    assert (run_dir / "tuner" / "oracle.json").exists()

    # Both workers took part, the chief ran no trial: the workers' trials are exactly the oracle's.
    reports = {
        i: json.loads((run_dir / "tuning" / f"tuner{i}.trials.json").read_text()) for i in (0, 1)
    }
    ran = [trial for report in reports.values() for trial in report["trials"]]
    assert sorted(ran) == sorted(t["trial"] for t in trials), reports
    assert all(report["trials"] for report in reports.values()), reports
    for role in ("chief", "tuner0", "tuner1"):
        assert (run_dir / "tuning" / f"{role}.log").stat().st_size > 0

    # The same shape as the single-process search on the same config.
    single_dir = tmp_path / "single"
    cfg = load_config("tiny", [f"data.root={tiny_dataset}", *SEARCH, "tune.workers=0"])
    single_best, single_trials = tune(cfg, _data(tiny_dataset), single_dir)
    assert set(best) == set(single_best)
    assert [list(t) for t in trials] == [list(t) for t in single_trials]
    with open(single_dir / "trials.csv") as f:
        assert list(csv.DictReader(f).fieldnames) == list(rows[0])
    print(f"distributed search: {seconds:.1f} s")


@pytest.mark.integration
def test_a_failing_chief_fails_the_task_and_stops_the_workers(prefect_api, tiny_dataset, tmp_path):
    # The oracle's port is taken (without SO_REUSEPORT, so gRPC cannot share it): the chief
    # fails to serve, and the workers, waiting for it, must be stopped rather than hang.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run_dir = tmp_path / "run"
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="tuner process chief failed") as error:
            _search_flow()(
                str(tiny_dataset),
                [*SEARCH, "tune.workers=2", f"tune.oracle_port={port}"],
                str(run_dir),
            )
        assert time.monotonic() - started < 180
    assert "last lines of" in str(error.value) and "Failed to bind" in str(error.value)
    assert (run_dir / "tuning" / "stop").read_text() == "failed"
    assert not (run_dir / "tuning" / "result.json").exists()
