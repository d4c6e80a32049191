"""Test-wide setup: every test session keeps its state (Prefect, BentoML, Keras, runs) in a
temporary project data dir, set before any of those libraries is imported."""

import inspect
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_resources import ALLOW_MISSING_ENV, RESOURCE_FIXTURES, allowed_missing, skip_missing

if "DEFECTFLOW_TEST_HOME" not in os.environ:
    os.environ["DEFECTFLOW_TEST_HOME"] = tempfile.mkdtemp(prefix="defectflow-test-")
for _key in ("DEFECTFLOW_HOME", "PREFECT_HOME", "BENTOML_HOME", "KERAS_HOME", "PREFECT_API_URL"):
    os.environ.pop(_key, None)
# Under pytest-xdist (make test) each worker process gets a data dir of its own: its own Prefect
# server, BentoML store and runs, so no test sees another worker's models or flow runs.
os.environ["DEFECTFLOW_HOME"] = str(
    Path(os.environ["DEFECTFLOW_TEST_HOME"]) / os.environ.get("PYTEST_XDIST_WORKER", "")
)
# Flow and task logs would interleave with pytest's own progress output.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from defectflow.environment import configure_environment  # noqa: E402

configure_environment()

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The real MVTec AD capsule copy, when present beside the repository (never in git).
CAPSULE_ROOT = REPO_ROOT.parent / "shared" / "data" / "mvtec_capsule" / "capsule"
PILL_ROOT = REPO_ROOT.parent / "shared" / "data" / "mvtec_pill" / "pill"

_RESOURCE_OUTCOMES = pytest.StashKey[dict]()
_SESSION_CONFIG: list = []


# Chromium for the page tests (browser_binary, browser, page): tests/helpers_browser.py; the
# container engine for the tests that build or run images (container_engine): helpers_container.py;
# how `make test` shares the files between its xdist workers: helpers_schedule.py.
pytest_plugins = ("helpers_browser", "helpers_container", "helpers_schedule")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small synthetic dataset in MVTec layout, shared by the tests that only read it."""
    from defectflow.data.synthetic import generate_dataset

    return generate_dataset(
        tmp_path_factory.mktemp("tiny") / "capsule",
        image_size=64,
        n_train_good=8,
        n_test_good=4,
        n_per_defect=4,
        seed=0,
    )


@pytest.fixture(scope="session")
def capsule_root() -> Path:
    if not CAPSULE_ROOT.is_dir():
        skip_missing("real_data", f"MVTec capsule data not found at {CAPSULE_ROOT}")
    return CAPSULE_ROOT


@pytest.fixture(scope="session")
def pill_root() -> Path:
    if not PILL_ROOT.is_dir():
        skip_missing("real_data", f"MVTec pill data not found at {PILL_ROOT}")
    return PILL_ROOT


# --- made once per session, by the first test that asks, shared by every test after it -------
# A shared server keeps every test's state apart by names: each test's flows, deployments,
# models and runs have names or ids of their own. A test that stops, restarts or reconfigures
# a server starts its own.


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator:
    """One `prefect server start` for the session (helpers_processes.PrefectServer), on a free
    127.0.0.1 port, its PREFECT_HOME and log in the session's tmp dir, stopped at the end. A
    subprocess runs its flows there with `prefect_server.client_env(env)`; this process with
    the `prefect_api` fixture."""
    from helpers_processes import prefect_server as start

    with start(tmp_path_factory.mktemp("prefect-server")) as server:
        yield server


@pytest.fixture
def prefect_api(prefect_server) -> Iterator:
    """The flows this test runs in this process go to the session's Prefect server; the logs and
    events they queued are sent before the next test (as prefect_test_harness does)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            drained = APILogWorker.instance().drain()
            if inspect.isawaitable(drained):
                await drained
        except RuntimeError:  # no log worker was started
            pass
        drained = EventsWorker.drain_all()
        if inspect.isawaitable(drained):
            await drained

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        try:
            yield prefect_server
        finally:
            run_coro_as_sync(drain())


@pytest.fixture(scope="session")
def pipeline_model(tmp_path_factory, tiny_dataset, prefect_server):
    """A model trained by the real pipeline with its anomaly head, served from TFLite, and its
    Bento (tests/helpers_pipeline.py): what users serve by default. Its flow runs on the
    session's Prefect server."""
    from helpers_pipeline import train_pipeline_model

    return train_pipeline_model(
        tmp_path_factory.mktemp("pipeline"), tiny_dataset, REPO_ROOT, prefect_server.api_url
    )


@pytest.fixture(scope="session")
def pipeline_server(pipeline_model, tmp_path_factory) -> Iterator:
    """`bentoml serve` of the pipeline model's Bento as users run it (the shipped serve config:
    TFLite in the HTTP process, `serve.threads`, no token, inbox off), one process for the
    session (helpers_processes.ServedBento: url, pid, log), for tests that only send it
    requests. A test that needs other settings, a token or the inbox serves its own.

    It serves from a copy of the pipeline's store: every `bentoml serve` empties the Prometheus
    folder of its BENTOML_HOME, so servers the tests start on the pipeline's store beside it
    would otherwise reset its metrics, and it would add to theirs."""
    import shutil

    from helpers_processes import isolated_env, served_bento

    root = tmp_path_factory.mktemp("pipeline-serve")
    shutil.copytree(
        pipeline_model.home / "bentoml",
        root / "home" / "bentoml",
        ignore=shutil.ignore_patterns("prometheus_multiproc_dir"),  # another server's
    )
    env = isolated_env(root / "home")
    with served_bento(pipeline_model.bento_tag, env, root / "serve.log") as served:
        yield served


# --- tests that need something a machine may lack --------------------------------------------
# CI has all of it: there a test that cannot run fails the run. A laptop without Docker, say,
# allows that skip explicitly: DEFECTFLOW_ALLOW_MISSING=container (comma-separated kinds, or
# "all"). The end of every run lists, per kind, what ran and what skipped.


def _kinds_of(item) -> set[str]:
    return {
        kind
        for fixture, kind in RESOURCE_FIXTURES.items()
        if fixture in getattr(item, "fixturenames", ())
    }


# --- the slow tier ------------------------------------------------------------------------
# `slow`: trains for about half a minute or more on 2 cores; `make test-fast` leaves it out
# (with `integration`), `make test` runs it. A test says @pytest.mark.slow itself; these were
# marked here because their files were being changed by others when the tier was made (move the
# mark into the file when you next edit it). Beside them: seconds measured on 2 idle cores.
SLOW_TESTS = {
    "tests/training/test_train.py::test_tuner_algorithms_write_a_trials_table[hyperband]",  # 44
    "tests/training/test_train.py::test_gpu_code_path_mixed_precision_and_xla_on_cpu",  # 28
    "tests/training/test_train.py::test_lite0_trains_in_two_phases",  # 35
    "tests/training/test_train_resume.py::test_sigkilled_training_resumes_from_its_last_checkpoint",  # 71
    "tests/training/test_train_resume.py::test_a_resumed_first_phase_does_not_shift_the_second",  # 48
}


def _mark_slow(items) -> None:
    collected = {item.nodeid for item in items}
    for item in items:
        if item.nodeid in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
    files = {nodeid.split("::")[0] for nodeid in collected}
    gone = sorted(n for n in SLOW_TESTS if n.split("::")[0] in files and n not in collected)
    if gone:  # renamed or removed: say so rather than let it slip back into the quick tier
        warnings.warn(
            pytest.PytestWarning(f"conftest.SLOW_TESTS names tests not collected: {gone}"),
            stacklevel=1,
        )


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    _mark_slow(items)
    for item in items:
        kinds = _kinds_of(item)
        if kinds:  # reaches the reports, also those an xdist worker sends back
            item.user_properties.append(("resource_kinds", sorted(kinds)))


def pytest_runtest_logreport(report):
    kinds = dict(report.user_properties).get("resource_kinds")
    if not kinds or not _SESSION_CONFIG:
        return
    outcome = None
    if report.skipped:
        outcome = "skipped"
    elif report.when == "call":
        outcome = report.outcome
    elif report.failed:
        outcome = "error"
    if outcome:
        reason = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else ""
        for kind in kinds:
            _SESSION_CONFIG[0].stash[_RESOURCE_OUTCOMES].setdefault(kind, []).append(
                (report.nodeid, outcome, reason)
            )


def pytest_configure(config):
    _SESSION_CONFIG[:] = [config]
    config.stash[_RESOURCE_OUTCOMES] = {}


def pytest_terminal_summary(terminalreporter, config):
    outcomes = config.stash.get(_RESOURCE_OUTCOMES, {})
    if not outcomes or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    terminalreporter.section("tests that need Docker, Chromium or the real data")
    terminalreporter.write_line(
        f"allowed to skip ({ALLOW_MISSING_ENV}): {', '.join(sorted(allowed_missing())) or 'nothing'}"
    )
    for kind in sorted(set(RESOURCE_FIXTURES.values())):
        rows = outcomes.get(kind, [])
        counts = {
            o: sum(1 for _, got, _ in rows if got == o)
            for o in ("passed", "failed", "error", "skipped")
        }
        terminalreporter.write_line(
            f"{kind}: ran {counts['passed'] + counts['failed'] + counts['error']} "
            f"({counts['passed']} passed, {counts['failed'] + counts['error']} failed), "
            f"skipped {counts['skipped']}"
        )
        for nodeid, outcome, reason in rows:
            terminalreporter.write_line(
                f"  {outcome:8} {nodeid}" + (f"  ({reason})" if reason else "")
            )
