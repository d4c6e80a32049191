"""Test-wide setup: every test session keeps its state (Prefect, BentoML, Keras, runs) in a
temporary project data dir, set before any of those libraries is imported."""

import os
import tempfile
from pathlib import Path

import pytest

if "DEFECTFLOW_TEST_HOME" not in os.environ:
    os.environ["DEFECTFLOW_TEST_HOME"] = tempfile.mkdtemp(prefix="defectflow-test-")
for _key in ("DEFECTFLOW_HOME", "PREFECT_HOME", "BENTOML_HOME", "KERAS_HOME", "PREFECT_API_URL"):
    os.environ.pop(_key, None)
os.environ["DEFECTFLOW_HOME"] = os.environ["DEFECTFLOW_TEST_HOME"]
# Flow and task logs would interleave with pytest's own progress output.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from defectflow.environment import configure_environment  # noqa: E402

configure_environment()

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The real MVTec AD capsule copy, when present beside the repository (never in git).
CAPSULE_ROOT = REPO_ROOT.parent / "shared" / "data" / "mvtec_capsule" / "capsule"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small synthetic dataset in MVTec layout, shared by the tests that only read it."""
    from defectflow.data.synthetic import generate_dataset

    return generate_dataset(
        tmp_path_factory.mktemp("tiny") / "capsule",
        image_size=64, n_train_good=8, n_test_good=4, n_per_defect=4, seed=0,
    )


@pytest.fixture(scope="session")
def capsule_root() -> Path:
    if not CAPSULE_ROOT.is_dir():
        print(f"MVTec capsule data not found at {CAPSULE_ROOT}: skipping real-data test")
        pytest.skip(f"MVTec capsule data not found at {CAPSULE_ROOT}")
    return CAPSULE_ROOT
