"""examples/: each example runs as a user would run it, on the synthetic data it makes itself."""

import subprocess
import sys
from pathlib import Path

import pytest
from helpers_processes import REPO_ROOT, isolated_env

pytestmark = pytest.mark.integration


def test_train_minimal_trains_saves_predicts_and_evaluates(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "train_minimal.py")],
        cwd=tmp_path,
        env=isolated_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "| accuracy |" in out and "| class | precision | recall | F1 | support |" in out
    model_dir = Path(out.strip().splitlines()[-1].removeprefix("model folder: "))
    assert (model_dir / "model.keras").is_file() and (model_dir / "model.json").is_file()
