"""Where defectflow keeps its state, and the environment the libraries read it from.

Prefect, BentoML, Keras and matplotlib (its font cache) all default to folders under $HOME,
and some phone home. Setting their variables here, before they are imported, keeps every byte
of state under one project data dir (default `.defectflow/`, override with DEFECTFLOW_HOME) and
telemetry off.
"""

from __future__ import annotations

import os
from pathlib import Path


def project_home() -> Path:
    return Path(os.environ.get("DEFECTFLOW_HOME", ".defectflow")).expanduser().resolve()


def configure_environment(home: str | Path | None = None) -> Path:
    """Set (without overriding what the user already set) the state folders and telemetry flags."""
    root = Path(home).expanduser().resolve() if home else project_home()
    defaults = {
        "DEFECTFLOW_HOME": str(root),
        "PREFECT_HOME": str(root / "prefect"),
        "BENTOML_HOME": str(root / "bentoml"),
        "KERAS_HOME": str(root / "keras"),
        "MPLCONFIGDIR": str(root / "matplotlib"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "BENTOML_DO_NOT_TRACK": "true",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "KERAS_BACKEND": "tensorflow",
        # defectflow's own log lines (src/defectflow uses `logging`) go to the Prefect run log too.
        "PREFECT_LOGGING_EXTRA_LOGGERS": "defectflow",
        # A flow run's heartbeat every 30 s (Prefect's minimum; its default is 180 s): the stack's
        # zombie automation marks a run without one for 90 s Crashed (orchestration/stack.py).
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    for key in ("PREFECT_HOME", "BENTOML_HOME", "KERAS_HOME", "MPLCONFIGDIR"):
        Path(os.environ[key]).mkdir(parents=True, exist_ok=True)
    return root
