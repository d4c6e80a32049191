"""Evaluation tasks: metrics on the test split and the gate."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from defectflow.calibration import calibrate_model
from defectflow.data.split import SplitSample, select
from defectflow.evaluation import Evaluation, evaluate_model_dir
from defectflow.gate import GateDecision, decide, require_pass


@task(name="calibrate-thresholds", cache_policy=NONE)
def calibrate_thresholds(cfg, model_dir: Path, rows: list[SplitSample], run_dir: Path) -> dict | None:
    """P(defect) and mask thresholds chosen on the validation split, stored with the model."""
    if not cfg.eval.calibrate:
        get_run_logger().info("calibration off: argmax class, mask threshold %s", cfg.eval.mask_threshold)
        return None
    thresholds = calibrate_model(model_dir, select(rows, "val"), cfg.train.batch_size, run_dir / "calibration.json")
    create_markdown_artifact(markdown=thresholds.markdown(), key="calibration",
                             description="Decision thresholds chosen on the validation split")
    get_run_logger().info("thresholds from the validation split: P(defect) > %.2f, mask > %.2f",
                          thresholds.defect_threshold, thresholds.mask_threshold)
    return thresholds.__dict__


@task(name="evaluate-model", cache_policy=NONE)
def evaluate_model(cfg, model_dir: Path, rows: list[SplitSample], run_dir: Path) -> Evaluation:
    result = evaluate_model_dir(model_dir, select(rows, "test"), run_dir / "evaluation", cfg.train.batch_size,
                                cfg.eval.plot_count)
    create_markdown_artifact(markdown=result.markdown(), key="test-metrics", description="Test split metrics")
    get_run_logger().info("test metrics %s", {k: round(v, 4) for k, v in result.headline().items()})
    return result


@task(name="gate", cache_policy=NONE)
def apply_gate(cfg, evaluation: Evaluation, run_dir: Path) -> GateDecision:
    decision = decide(evaluation.metrics, cfg.gate)
    (run_dir / "gate.json").write_text(json.dumps({"passed": decision.passed, "checks": decision.checks}, indent=2))
    create_markdown_artifact(markdown=decision.message() + "\n\n" + decision.markdown(), key="gate-decision")
    get_run_logger().info(decision.message())
    require_pass(decision)
    return decision
