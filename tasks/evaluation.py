"""Evaluation tasks: metrics on the test split and the gate."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from defectflow.data.split import SplitSample, select
from defectflow.evaluation import Evaluation, evaluate
from defectflow.gate import GateDecision, decide, require_pass
from defectflow.inference import METRICS_FILE, Predictor


@task(name="evaluate-model", cache_policy=NONE)
def evaluate_model(cfg, model_dir: Path, rows: list[SplitSample], run_dir: Path) -> Evaluation:
    predictor = Predictor.load(model_dir)
    result = evaluate(predictor, select(rows, "test"), cfg.train.batch_size,
                      plot_dir=run_dir / "evaluation", plot_count=cfg.eval.plot_count)
    result.save(run_dir / "evaluation")
    (model_dir / METRICS_FILE).write_text(json.dumps(result.metrics, indent=2))
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
