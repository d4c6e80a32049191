"""The stage clock: what the Prefect task hook notes per flow run, and what a run folder keeps
(the hook is called here with stand-ins for Prefect's task, task run and state; the pipeline
test in tests/flows runs it under Prefect)."""

import json
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from defectflow.orchestration import stage_times

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _end(name, flow_run_id, start_s, end_s, state="Completed"):
    """A task run of `name` that ran from T0 + start_s to T0 + end_s (None: never ran)."""
    run = SimpleNamespace(
        flow_run_id=flow_run_id,
        start_time=None if start_s is None else T0 + timedelta(seconds=start_s),
        end_time=None if end_s is None else T0 + timedelta(seconds=end_s),
    )
    stage_times.note_stage(SimpleNamespace(name=name), run, SimpleNamespace(name=state))


def test_each_flow_run_takes_its_own_stages_once():
    mine, other = uuid.uuid4(), uuid.uuid4()
    _end("load-config", mine, 0, 0.5)
    _end("train-model", other, 0, 99)
    _end("scan-data", mine, None, None, state="Cached")  # answered by the cache: never ran
    _end("train-model", mine, 1, 61)
    notes = stage_times.take(mine)
    assert [(n["stage"], n["state"], n["seconds"]) for n in notes] == [
        ("load-config", "Completed", 0.5),
        ("scan-data", "Cached", 0.0),
        ("train-model", "Completed", 60.0),
    ]
    assert stage_times.take(mine) == []  # taken once
    assert stage_times.stage_seconds(notes) == {
        "load-config": 0.5,
        "scan-data": 0.0,
        "train-model": 60.0,
    }
    assert stage_times.wall_seconds(notes) == 61.0  # first start to last end, gaps included
    assert [n["stage"] for n in stage_times.take(str(other))] == ["train-model"]


def test_outside_a_flow_nothing_is_noted():
    _end("load-config", None, 0, 1)
    assert stage_times.take(None) == []


def test_a_stage_run_twice_is_added_up_and_no_stage_is_no_time():
    notes = [
        {
            "stage": "load-config",
            "state": "Completed",
            "seconds": 1.25,
            "started": None,
            "ended": None,
        },
        {
            "stage": "load-config",
            "state": "Completed",
            "seconds": 0.5,
            "started": None,
            "ended": None,
        },
    ]
    assert stage_times.stage_seconds(notes) == {"load-config": 1.75}
    assert stage_times.wall_seconds(notes) == 0.0 == stage_times.wall_seconds([])


def test_notes_of_flow_runs_nobody_takes_are_bounded():
    first = uuid.uuid4()
    _end("fingerprint-data", first, 0, 1)
    for _ in range(stage_times.MAX_FLOW_RUNS):
        _end("fingerprint-data", uuid.uuid4(), 0, 1)
    assert stage_times.take(first) == []  # the oldest was forgotten


def test_the_run_folder_keeps_every_stage_and_the_wall_time(tmp_path):
    run_id = uuid.uuid4()
    _end("train-model", run_id, 2, 12)
    _end("gate", run_id, 13, 13.5, state="Failed")
    notes = stage_times.take(run_id)
    saved = json.loads(stage_times.write(notes, tmp_path).read_text())
    assert saved["stage_seconds"] == {"train-model": 10.0, "gate": 0.5}
    assert saved["wall_seconds"] == 11.5 and saved["stages"][1]["state"] == "Failed"
    table = stage_times.markdown(notes)
    assert "| train-model | Completed | 10.0 |" in table and "| 11.5 |" in table
