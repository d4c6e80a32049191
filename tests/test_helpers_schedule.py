"""The xdist schedule of `make test` (tests/helpers_schedule.py), driven with stand-in workers:
what each worker is sent, in which order."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import helpers_schedule
from helpers_schedule import CONTAINER_FILES, CONTAINER_UNIT, WEIGHTS, unit_of

TESTS = Path(__file__).resolve().parent


class StandInWorker:
    """What the scheduler calls on a worker: the tests it is sent, by collection index."""

    def __init__(self, name: str) -> None:
        self.gateway = SimpleNamespace(id=name)
        self.sent: list[list[int]] = []
        self.shutting_down = False

    def send_runtest_some(self, indexes: list[int]) -> None:
        self.sent.append(indexes)

    def shutdown(self) -> None:
        self.shutting_down = True


def _scheduler(collection: list[str], workers: list[StandInWorker]):
    config = SimpleNamespace(  # what the scheduler reads of `pytest -n 2 --dist loadfile`
        getoption=lambda name, default=None: "loadfile",
        getvalue=lambda name: [f"{len(workers)}*popen"] if name == "tx" else None,
        option=SimpleNamespace(loadscopereorder=True),
    )
    scheduler = helpers_schedule.pytest_xdist_make_scheduler(config, None)
    for worker in workers:
        scheduler.add_node(worker)
    for worker in workers:
        scheduler.add_node_collection(worker, collection)
    scheduler.schedule()
    return scheduler


def _files(worker: StandInWorker, collection: list[str]) -> list[list[str]]:
    return [sorted({collection[i].split("::")[0] for i in batch}) for batch in worker.sent]


def test_heaviest_units_go_out_first_and_the_container_files_stay_together():
    collection = [
        *(f"tests/data/test_many.py::test_{i}" for i in range(30)),
        "tests/flows/test_nightly_simulation.py::test_ten_nights",
        "tests/orchestration/test_docker_pool.py::test_a",
        "tests/orchestration/test_docker_pool.py::test_b",
        "tests/flows/test_orchestration.py::test_a",
        "tests/test_compose_stack.py::test_a",
        "tests/test_container.py::test_a",
        "tests/test_container.py::test_b",
        "tests/test_config.py::test_a",
    ]
    first, second = StandInWorker("gw0"), StandInWorker("gw1")
    scheduler = _scheduler(collection, [first, second])

    # The container unit (heaviest) and test_orchestration go out first, one per worker; the
    # one-test simulation follows on the worker whose first unit is already almost done.
    assert _files(first, collection)[0] == sorted(CONTAINER_FILES)
    assert _files(second, collection)[:2] == [
        ["tests/flows/test_orchestration.py"],
        ["tests/flows/test_nightly_simulation.py"],
    ]
    # Then by size: the file of 30 quick tests before the one of a single test.
    assert list(scheduler.workqueue) == ["tests/data/test_many.py", "tests/test_config.py"]


def test_other_dist_modes_are_left_to_xdist():
    config = SimpleNamespace(getoption=lambda name, default=None: "load")
    assert helpers_schedule.pytest_xdist_make_scheduler(config, None) is None


def test_every_file_that_uses_the_container_engine_is_in_the_container_unit():
    users = {
        path.relative_to(TESTS.parent).as_posix()
        for path in TESTS.rglob("test_*.py")
        if "container_engine" in path.read_text() and path.name != Path(__file__).name
    }
    assert users == set(CONTAINER_FILES)
    assert {unit_of(f"{path}::test_x") for path in users} == {CONTAINER_UNIT}


def test_the_weights_name_files_that_exist():
    for unit in WEIGHTS:
        if unit != CONTAINER_UNIT:
            assert (TESTS.parent / unit).is_file(), unit
