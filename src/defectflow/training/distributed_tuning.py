"""Distributed hyper-parameter search with KerasTuner's own chief/worker protocol.

With `tune.workers` = N > 0 the search runs in N + 1 processes, each this module's entry point:

    KERASTUNER_TUNER_ID=chief|tuner0|tuner1... KERASTUNER_ORACLE_IP=HOST KERASTUNER_ORACLE_PORT=PORT \\
        python -m defectflow.training.distributed_tuning --config RUN/tuning/config.yaml --data RUN/tuning/data.json --out RUN

KerasTuner does the rest: the chief serves the oracle over gRPC (it decides every trial and
collects every score) and returns once the workers have taken the whole budget; each worker
asks it for a trial, trains it, reports the score, and stops when the oracle says so. Every
process builds its tuner with `defectflow.training.tune.build_tuner`, the builder of the
single-process `tune`, so the chief ends with the same trials table (trials.csv/json in RUN
and `result.json` here) as a single-process search.

All tuners share RUN/tuner as KerasTuner expects: each writes its own `<tuner id>.json` and the
folders of the trials it runs, only the chief writes oracle.json and the trials' trial.json.
For workers on other machines that folder must be shared storage when the algorithm reads an
earlier trial's checkpoint (hyperband); the other algorithms only need the config, the data
file and the sample paths in it to be readable there.

Everything the processes exchange through RUN/tuning is text: the config as YAML, the sample
lists, the chief's result and the workers' reports as JSON. No pickle: that folder may be shared
storage, and unpickling a file someone planted there would run their code in every process.

Nothing here knows about Prefect: `tasks/training.py` starts the processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

from defectflow.config import from_yaml, to_yaml
from defectflow.data.mvtec import Sample
from defectflow.files import atomic_write
from defectflow.training.train import PreparedData
from defectflow.training.tune import build_tuner, run_search, search_results

log = logging.getLogger(__name__)

CHIEF = "chief"
#: Inputs and outputs of the processes, inside the run folder.
TUNING_DIR = "tuning"
CONFIG_FILE = "config.yaml"
DATA_FILE = "data.json"
#: The chief's answer: {"best": {...}, "trials": [...]}.
RESULT_FILE = "result.json"
#: Marks DATA_FILE as what it is, and which layout of it.
DATA_FORMAT = "defectflow-tuning-samples/1"
_SAMPLE_KEYS = {"path", "label", "mask_path", "origin"}


class ExchangeFileError(ValueError):
    """A file in RUN/tuning is not what the processes wrote there (the message says why)."""


def worker_ids(workers: int) -> list[str]:
    """KerasTuner's conventional worker ids: tuner0, tuner1, ..."""
    return [f"tuner{i}" for i in range(workers)]


def tuner_env(tuner_id: str, host: str, port: int) -> dict[str, str]:
    """The environment variables that give a process its KerasTuner role."""
    return {
        "KERASTUNER_TUNER_ID": tuner_id,
        "KERASTUNER_ORACLE_IP": host,
        "KERASTUNER_ORACLE_PORT": str(port),
    }


def free_port(host: str) -> int:
    """A port nobody listens on at `host` right now (the chief binds it a moment later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def prepare(cfg, data: PreparedData, out_dir: Path) -> Path:
    """Write the config and the samples the processes read into OUT/tuning, and clear the
    previous search: a distributed search always starts afresh (the processes open the shared
    tuner folder without overwriting, so that no process deletes what another has written)."""
    tuning = out_dir / TUNING_DIR
    for old in (out_dir / "tuner", tuning):
        shutil.rmtree(old, ignore_errors=True)
    tuning.mkdir(parents=True)
    atomic_write(tuning / CONFIG_FILE, to_yaml(cfg).encode())
    # The sample lists only: every process reads the images itself, at the sizes it tries.
    atomic_write(tuning / DATA_FILE, json.dumps(data_to_json(data), indent=1).encode())
    return tuning


def data_to_json(data: PreparedData) -> dict:
    """The sample lists and classes of `data` as JSON-ready values (no arrays: see `prepare`)."""

    def sample(s: Sample) -> dict:
        return {
            "path": str(s.path),
            "label": s.label,
            "mask_path": None if s.mask_path is None else str(s.mask_path),
            "origin": s.origin,
        }

    return {
        "format": DATA_FORMAT,
        "classes": list(data.classes),
        "train": [sample(s) for s in data.train_samples],
        "val": [sample(s) for s in data.val_samples],
    }


def _read_json(path: Path, what: str):
    """The JSON in `path`, or ExchangeFileError; never anything that would run code."""
    raw = Path(path).read_bytes()
    if raw[:1] == b"\x80":  # pickle protocol 2+ starts with PROTO
        raise ExchangeFileError(
            f"{path} is a pickle, not the {what} (JSON); pickles from the "
            "exchange folder are never loaded"
        )
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExchangeFileError(f"{path} is not the {what} (JSON): {exc}") from None


def read_data(path: Path) -> PreparedData:
    """The PreparedData `prepare` wrote to `path`; ExchangeFileError for any other file."""
    doc = _read_json(path, "tuning data file")

    def fail(why: str) -> ExchangeFileError:
        return ExchangeFileError(f"{path} is not a tuning data file: {why}")

    if not isinstance(doc, dict) or doc.get("format") != DATA_FORMAT:
        raise fail(f'no "format": {DATA_FORMAT!r}')
    classes = doc.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise fail('"classes" is not a list of names')

    def sample(row, split: str, index: int) -> Sample:
        if (
            not isinstance(row, dict)
            or set(row) != _SAMPLE_KEYS
            or not all(isinstance(row[k], str) for k in ("path", "label", "origin"))
            or not isinstance(row["mask_path"], str | None)
        ):
            raise fail(f"{split}[{index}] is not a sample ({sorted(_SAMPLE_KEYS)}, strings)")
        mask = row["mask_path"]
        return Sample(
            Path(row["path"]), row["label"], None if mask is None else Path(mask), row["origin"]
        )

    splits = {}
    for split in ("train", "val"):
        rows = doc.get(split)
        if not isinstance(rows, list):
            raise fail(f'"{split}" is not a list')
        splits[split] = [sample(row, split, i) for i, row in enumerate(rows)]
    return PreparedData(splits["train"], splits["val"], classes)


def command(out_dir: Path, *, exit_with_parent: bool = True) -> list[str]:
    """The command line of one tuner process (its role comes from the environment)."""
    tuning = out_dir / TUNING_DIR
    args = [
        sys.executable,
        "-m",
        "defectflow.training.distributed_tuning",
        "--config",
        str(tuning / CONFIG_FILE),
        "--data",
        str(tuning / DATA_FILE),
        "--out",
        str(out_dir),
        "--result",
        str(tuning / RESULT_FILE),
    ]
    return [*args, "--exit-with-parent"] if exit_with_parent else args


def worker_report(out_dir: Path, tuner_id: str) -> Path:
    """Where a worker lists the trials it ran."""
    return out_dir / TUNING_DIR / f"{tuner_id}.trials.json"


def run_tuner(cfg, data: PreparedData, out_dir: Path, result_file: Path | None = None) -> dict:
    """Run one tuner process in the role the KERASTUNER_* environment variables give it.

    The chief serves the oracle until the search is over, then writes trials.csv/json to
    `out_dir` and {"best", "trials"} to `result_file`; a worker runs trials until the chief
    stops it and lists them in `worker_report`. Returns what was written.
    """
    tuner_id = os.environ.get("KERASTUNER_TUNER_ID")
    if (
        not tuner_id
        or "KERASTUNER_ORACLE_IP" not in os.environ
        or "KERASTUNER_ORACLE_PORT" not in os.environ
    ):
        raise RuntimeError(
            "a distributed tuner process needs KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_IP and "
            "KERASTUNER_ORACLE_PORT"
        )
    tuner = build_tuner(cfg, data, out_dir, overwrite=False)
    started = time.monotonic()
    run_search(tuner, cfg)
    if tuner_id == CHIEF:
        best, trials = search_results(tuner, cfg, out_dir)
        result = {"best": best, "trials": trials}
        if result_file is not None:
            atomic_write(result_file, json.dumps(result, indent=2).encode())
        log.info(
            "chief: %d trials in %.1f s, best %s", len(trials), time.monotonic() - started, best
        )
        return result
    report = {
        "tuner_id": tuner_id,
        "trials": list(tuner.trials_run),
        "seconds": round(time.monotonic() - started, 1),
    }
    atomic_write(worker_report(out_dir, tuner_id), json.dumps(report, indent=2).encode())
    log.info("%s: ran trials %s in %.1f s", tuner_id, report["trials"], report["seconds"])
    return report


def read_result(path: Path) -> tuple[dict, list[dict]]:
    """The chief's (best, trials), as `defectflow.training.tune.tune` returns them."""
    result = _read_json(path, "tuning result")
    if not (
        isinstance(result, dict)
        and isinstance(result.get("best"), dict)
        and isinstance(result.get("trials"), list)
    ):
        raise ExchangeFileError(f'{path} is not a tuning result: no "best" and "trials"')
    return result["best"], result["trials"]


def _exit_with_parent() -> None:
    """Exit when the launching process dies (it is then re-parented), so a killed launcher
    leaves no tuner behind waiting an hour for a chief that is gone."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(2)
            if os.getppid() != parent:
                print(
                    f"tuner process: parent {parent} is gone, exiting", file=sys.stderr, flush=True
                )
                os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m defectflow.training.distributed_tuning",
        description=(
            "One process of a distributed KerasTuner search; the role (chief, tuner0, tuner1, ...) and the "
            "chief's address come from KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT."
        ),
    )
    parser.add_argument("--config", type=Path, required=True, help="the saved run config (YAML)")
    parser.add_argument(
        "--data", type=Path, required=True, help="the sample lists (JSON, written by prepare)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="the run folder: RUN/tuner, trials.csv"
    )
    parser.add_argument("--result", type=Path, help="chief: where to write the result JSON")
    parser.add_argument(
        "--exit-with-parent", action="store_true", help="exit when the launching process dies"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
        force=True,
    )
    if args.exit_with_parent:
        _exit_with_parent()
    from defectflow.environment import configure_environment

    configure_environment()
    cfg = from_yaml(args.config.read_text())
    try:
        data = read_data(args.data)
    except ExchangeFileError as exc:
        print(f"tuner process: {exc}", file=sys.stderr, flush=True)
        return 2
    run_tuner(cfg, data, args.out, args.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
