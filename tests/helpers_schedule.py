"""How `make test` (`pytest -n 2 --dist loadfile`) shares the suite between its xdist workers.

pytest-xdist's own `loadfile` keeps each file whole on one worker, in order (so module-scoped
fixtures are shared as in a plain run), but hands the files out by how many tests they hold,
most first. Here two things about this suite change that:

- The files that use the container engine are one unit. They take turns on the machine's one
  `dockerd` anyway (scripts/container.py's session lock), so on two workers one of them would
  only wait for the other, for minutes.
- Units go out heaviest first (longest-processing-time first): a long file with one test, such
  as the ten-night simulation, used to start last and run alone at the end while the other
  worker had nothing to do. The weights are seconds from a `make test` run with `--durations`
  (setup, call and teardown of the file's tests); only their order matters, and a file not
  listed counts one second per test.

Any other `--dist` mode, or a run without xdist, is left to pytest-xdist.
"""

from __future__ import annotations

import pytest

#: The test files that use the `container_engine` fixture (tests/helpers_container.py), one
#: unit (tests/test_helpers_schedule.py checks that no other file uses it).
CONTAINER_FILES = (
    "tests/orchestration/test_docker_pool.py",
    "tests/test_container.py",
    "tests/test_compose_stack.py",
)
CONTAINER_UNIT = "container engine: " + ", ".join(CONTAINER_FILES)

#: Seconds per unit, measured under `make test` on 2 cores (2026-12-06, --durations=0).
WEIGHTS = {
    CONTAINER_UNIT: 1300,
    "tests/flows/test_orchestration.py": 780,
    "tests/flows/test_training_flow.py": 560,
    "tests/flows/test_nightly_simulation.py": 470,
    "tests/training/test_train.py": 290,
    "tests/training/test_train_resume.py": 220,
    "tests/test_service.py": 140,
    "tests/training/test_distributed_tuning.py": 125,
    "tests/flows/test_review_loop.py": 100,
    "tests/test_coverage_signals.py": 85,
    "tests/test_presence_signals.py": 85,
    "tests/flows/test_deployment.py": 80,
    "tests/serving/web/test_review_page.py": 65,
    "tests/serving/web/test_ui_page.py": 45,
    "tests/serving/web/test_review_service.py": 45,
    "tests/serving/web/test_review_trust.py": 40,
    "tests/orchestration/test_postgres.py": 40,
    "tests/inference/test_anomaly_score.py": 40,
}


def unit_of(nodeid: str) -> str:
    """The work unit of a test: its file, or the container unit."""
    path = nodeid.split("::", 1)[0]
    return CONTAINER_UNIT if path in CONTAINER_FILES else path


def _scheduling_class():
    from xdist.scheduler import LoadScopeScheduling

    class HeaviestFirstScheduling(LoadScopeScheduling):
        """`--dist loadfile` with the container unit, handing out the heaviest unit first."""

        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

        def _assign_work_unit(self, node) -> None:
            heaviest = max(  # unlisted units: one second per test
                self.workqueue, key=lambda unit: WEIGHTS.get(unit, len(self.workqueue[unit]))
            )
            self.workqueue.move_to_end(heaviest, last=False)  # the base class takes the first
            super()._assign_work_unit(node)

    return HeaviestFirstScheduling


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown to a run without it
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist", None) != "loadfile":
        return None
    return _scheduling_class()(config, log)
