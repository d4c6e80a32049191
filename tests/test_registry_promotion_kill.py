"""Promotion is atomic: SIGKILL a promotion at several points, then check the store.

A store with production model A and candidate B is copied once per kill point. A fresh
interpreter promotes B there, with one step of the promotion replaced by "finish this step
(or not), then SIGKILL myself". Afterwards the stage book must name exactly one production
model, A or B as the kill point implies, complete and loadable, and the next promotion works.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_models import make_tiny_model_dir

pytestmark = pytest.mark.integration

_SETUP = """
import sys
from pathlib import Path
from defectflow.environment import configure_environment
configure_environment(sys.argv[1])
from defectflow import registry
a = registry.save_model(Path(sys.argv[2]), "defectflow", {"metrics": {"accuracy": 0.8}})
b = registry.save_model(Path(sys.argv[3]), "defectflow", {"metrics": {"accuracy": 0.9}})
registry.promote(a)
print(a, b)
"""

# Kill points: (the function wrapped, whether the real call runs before the kill).
_PROMOTE_KILLED = """
import os, signal, sys
from defectflow.environment import configure_environment
configure_environment(sys.argv[1])
from defectflow import registry

point, tag = sys.argv[2], sys.argv[3]

def killing(real, run_first, after_calls=0):
    calls = []
    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) > after_calls:
            if run_first:
                real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return wrapper

if point == "while-verifying":      # half-way through the checksums of the new model
    registry.sha256_file = killing(registry.sha256_file, run_first=True, after_calls=1)
elif point == "before-writing":     # decided, nothing written
    registry._write_book = killing(registry._write_book, run_first=False)
elif point == "temporary-unsynced": # the new book written to the temporary file, not yet synced
    os.fsync = killing(os.fsync, run_first=False)
elif point == "before-rename":      # the temporary file complete and synced
    os.replace = killing(os.replace, run_first=False)
elif point == "after-rename":       # the new book in place, folder not yet synced
    os.replace = killing(os.replace, run_first=True)
elif point == "after-writing":      # everything done but returning
    registry._write_book = killing(registry._write_book, run_first=True)
registry.promote(tag, reason=f"killed at {point}")
print("promotion was not killed")
"""

#: kill point -> the production model afterwards ("old" = A, "new" = B)
EXPECTED = {
    "while-verifying": "old",
    "before-writing": "old",
    "temporary-unsynced": "old",
    "before-rename": "old",
    "after-rename": "new",
    "after-writing": "new",
}


def _env(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DEFECTFLOW_", "BENTOML_", "PREFECT_", "KERAS_"))
    }
    env["DEFECTFLOW_HOME"] = str(home)
    return env


def _python(code: str, home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, str(home), *args],
        env=_env(home),
        cwd=home.parent,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def base_store(tmp_path_factory) -> tuple[Path, str, str]:
    root = tmp_path_factory.mktemp("promotion")
    done = _python(
        _SETUP,
        root / "base",
        str(make_tiny_model_dir(root / "a", seed=0)),
        str(make_tiny_model_dir(root / "b", seed=1)),
    )
    assert done.returncode == 0, done.stderr
    a, b = done.stdout.split()[-2:]
    return root / "base", a, b


def _production(home: Path) -> tuple[str, list[str]]:
    book = json.loads((home / "bentoml" / "registry" / "defectflow.json").read_text())
    return book["lineage"][-1], book["archived"]


@pytest.mark.parametrize("point", list(EXPECTED))
def test_a_killed_promotion_leaves_one_complete_production_model(base_store, point, tmp_path):
    from defectflow.inference.predictor import Predictor
    from defectflow.registry import file_digests

    base, a, b = base_store
    home = tmp_path / "home"
    shutil.copytree(base, home)
    done = _python(_PROMOTE_KILLED, home, point, b)
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stdout, done.stderr)

    production, archived = _production(home)
    assert production == (a if EXPECTED[point] == "old" else b)
    assert production not in archived
    # Complete: every file as recorded when it was saved; loadable: it predicts.
    name, version = production.split(":")
    folder = home / "bentoml" / "models" / name / version
    recorded = json.loads(json.dumps(_metadata_files(folder)))
    assert file_digests(folder) == recorded
    prediction = Predictor.load(folder).predict_arrays([np.zeros((40, 40, 3), np.uint8)])[0]
    assert prediction.label in Predictor.load(folder).classes

    # The store is usable afterwards: the next promotion completes and cleans up.
    again = _python(_PROMOTE_KILLED, home, "none", b)
    assert again.returncode == 0, again.stderr
    assert _production(home) == (b, [a])
    assert not list((home / "bentoml" / "registry").glob("*.tmp"))


def _metadata_files(folder: Path) -> dict:
    import yaml

    return yaml.safe_load((folder / "model.yaml").read_text())["metadata"]["files"]
