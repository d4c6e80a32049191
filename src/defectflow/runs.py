"""Run folders: everything one pipeline run produces, in one place."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from defectflow.config import save_config


def new_run_dir(cfg) -> Path:
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
    run_dir = Path(cfg.paths.runs).expanduser().resolve() / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir
