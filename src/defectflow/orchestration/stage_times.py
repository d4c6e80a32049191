"""Wall time of each stage of a flow run: a Prefect task hook notes when each task run started
and ended, and the flow takes its own notes at the end (`STAGE_TIMES_FILE` in the run folder).

The hook runs in the process of the flow run, so the times are there the moment a task ends;
the Prefect API records task runs from events, later, and may not have them yet when the flow
asks. A stage is one task (`load-config`, ..., `write-report`); a task run the cache answered
counts as its own short stage, state `Cached`.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from datetime import datetime
from pathlib import Path

from defectflow.files import atomic_write

#: What the flow writes into its run folder.
STAGE_TIMES_FILE = "stage_times.json"
#: Flow runs whose notes are kept until taken: a flow that never takes them (it failed, or it
#: only uses a few timed tasks) must not grow a long-lived worker's memory.
MAX_FLOW_RUNS = 64

_lock = threading.Lock()
_notes: OrderedDict[str, list[dict]] = OrderedDict()


def note_stage(task, task_run, state) -> None:
    """Prefect `on_completion` / `on_failure` hook: one note for the task run's flow run.

    Wall seconds from the first Running to the final state (retries and their waits included);
    0 when the task never ran (its result came from the cache)."""
    if task_run.flow_run_id is None:  # called outside a flow: nothing to report to
        return
    start, end = task_run.start_time, task_run.end_time
    seconds = (end - start).total_seconds() if start and end else 0.0
    note = {
        "stage": task.name,
        "state": state.name,
        "seconds": round(seconds, 3),
        "started": start.isoformat() if start else None,
        "ended": end.isoformat() if end else None,
    }
    key = str(task_run.flow_run_id)
    with _lock:
        _notes.setdefault(key, []).append(note)
        _notes.move_to_end(key)
        while len(_notes) > MAX_FLOW_RUNS:
            _notes.popitem(last=False)


#: The keyword arguments of `prefect.task` that time a task as a stage of its flow run.
TIMED = {"on_completion": [note_stage], "on_failure": [note_stage]}


def take(flow_run_id) -> list[dict]:
    """The notes of one flow run, in the order its task runs ended, forgotten here."""
    with _lock:
        return _notes.pop(str(flow_run_id), []) if flow_run_id is not None else []


def stage_seconds(notes: list[dict]) -> dict[str, float]:
    """{stage: wall seconds}, in the order the stages ended; a stage run twice is added up."""
    out: dict[str, float] = {}
    for note in notes:
        out[note["stage"]] = round(out.get(note["stage"], 0.0) + note["seconds"], 3)
    return out


def wall_seconds(notes: list[dict]) -> float:
    """From the first stage's start to the last stage's end (stages and the flow's own time
    between them); 0 without a stage that ran."""
    starts = [datetime.fromisoformat(n["started"]) for n in notes if n["started"]]
    ends = [datetime.fromisoformat(n["ended"]) for n in notes if n["ended"]]
    return round((max(ends) - min(starts)).total_seconds(), 3) if starts and ends else 0.0


def markdown(notes: list[dict]) -> str:
    """The stages as a Markdown table, with the run's wall time below them."""
    lines = ["| stage | state | wall s |", "|---|---|---:|"]
    lines += [f"| {n['stage']} | {n['state']} | {n['seconds']:.1f} |" for n in notes]
    lines.append(f"| whole run (first start to last end) | | {wall_seconds(notes):.1f} |")
    return "\n".join(lines)


def write(notes: list[dict], run_dir: Path) -> Path:
    """`STAGE_TIMES_FILE` in `run_dir`: every note, the seconds per stage and the wall time."""
    path = Path(run_dir) / STAGE_TIMES_FILE
    atomic_write(
        path,
        json.dumps(
            {
                "stages": notes,
                "stage_seconds": stage_seconds(notes),
                "wall_seconds": wall_seconds(notes),
            },
            indent=2,
        ).encode()
        + b"\n",
    )
    return path
