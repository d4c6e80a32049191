"""Run folders: everything one pipeline run produces, in one place.

A run id names its folder. Starting a run with the id of an earlier one that did not finish
resumes it: finished tuner trials and training epochs are kept (see `defectflow.training.train`).
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path

from defectflow.config import save_config, to_yaml

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class RunConflict(ValueError):
    """A run id reused with a different configuration (resuming would mix two runs)."""


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def open_run_dir(cfg, run_id: str | None = None) -> tuple[Path, bool]:
    """The run folder and whether it already existed (a resumed run).

    A new run (no `run_id`) claims a folder nobody has: runs started at once by several
    workers on one data dir each get their own, never a resumed one of another run."""
    if run_id is None:
        runs = Path(cfg.paths.runs).expanduser().resolve()
        runs.mkdir(parents=True, exist_ok=True)
        while True:
            run_dir = runs / new_run_id()
            try:
                run_dir.mkdir()
            except FileExistsError:  # another run took this id in the same second
                continue
            save_config(cfg, run_dir / "config.yaml")
            return run_dir, False
    if not _RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r}: use letters, digits, '.', '_' and '-' (at most 100)")
    run_dir = Path(cfg.paths.runs).expanduser().resolve() / run_id
    saved = run_dir / "config.yaml"
    if saved.exists():
        if saved.read_text() != to_yaml(cfg):
            raise RunConflict(
                f"run {run_id} exists with another configuration ({saved}); resume it with the "
                "same config and overrides, or pick a new run id"
            )
        return run_dir, True
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved)
    return run_dir, False
