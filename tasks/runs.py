"""Run tasks: the wall time of each stage of the run, as the stages' hooks noted it
(`defectflow.orchestration.stage_times`)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from defectflow.orchestration import stage_times


@task(name="record-stage-times", cache_policy=NONE)
def record_stage_times(run_dir: Path) -> dict:
    """The seconds of every stage this flow run has ended so far, into run_dir/stage_times.json
    and a Prefect artifact: {"stage_seconds": {stage: s}, "wall_seconds": s}."""
    notes = stage_times.take(flow_run.id)
    path = stage_times.write(notes, run_dir)
    create_markdown_artifact(
        markdown=stage_times.markdown(notes),
        key="stage-times",
        description=f"wall time of each stage; {path}",
    )
    get_run_logger().info(
        "%d stages in %.1f s wall (%s)", len(notes), stage_times.wall_seconds(notes), path
    )
    return {
        "stage_seconds": stage_times.stage_seconds(notes),
        "wall_seconds": stage_times.wall_seconds(notes),
    }
