"""Evaluation tasks: thresholds, the challenger and the champion on the same test split, the gate, the summary over split seeds."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from defectflow.artifacts import MANIFEST_FILE, ModelInfo
from defectflow.data.ledger import GuardedTestSet
from defectflow.data.ledger import guard_test_set as guard
from defectflow.data.split import SplitSample, manifest_hashes, manifest_splits, select
from defectflow.evaluation import results
from defectflow.evaluation.calibration import calibrate_model
from defectflow.evaluation.evaluate import Evaluation, evaluate, evaluate_model_dir
from defectflow.evaluation.gate import GateDecision, decide
from defectflow.evaluation.report import (
    load_history,
    metrics_table_rows,
    summary_markdown,
    write_report,
)
from defectflow.inference.predictor import Predictor
from defectflow.orchestration.stage_times import TIMED
from defectflow.registry import RegistryError, production_tag, verify_model


@task(name="calibrate-thresholds", cache_policy=NONE, **TIMED)
def calibrate_thresholds(
    cfg, model_dir: Path, rows: list[SplitSample], run_dir: Path
) -> dict | None:
    """Temperature, P(defect), mask and confidence thresholds chosen on the validation split,
    stored with the model."""
    if not cfg.eval.calibrate:
        get_run_logger().info(
            "calibration off: argmax class, mask threshold %s, no temperature, every answer "
            "accepted",
            cfg.eval.mask_threshold,
        )
        return None
    thresholds = calibrate_model(
        model_dir,
        select(rows, "val"),
        cfg.train.batch_size,
        run_dir / "calibration.json",
        temperature_scaling=cfg.eval.temperature_scaling,
        accept_target_accuracy=cfg.eval.accept_target_accuracy,
        anomaly_false_alarm_rate=cfg.anomaly.false_alarm_rate,
        anomaly_agreement=cfg.eval.anomaly_agreement,
    )
    create_markdown_artifact(
        markdown=thresholds.markdown(),
        key="calibration",
        description="Temperature, decision and confidence thresholds chosen on the validation "
        "split",
    )
    get_run_logger().info(
        "from the validation split: temperature %.3f (ECE %.4f -> %.4f), P(defect) > %.2f, "
        "mask > %.2f, confidence >= %.4f (coverage %.3f, accuracy %.3f, target %s)",
        thresholds.temperature,
        thresholds.val_ece_before,
        thresholds.val_ece_after,
        thresholds.defect_threshold,
        thresholds.mask_threshold,
        thresholds.confidence_threshold,
        thresholds.val_coverage,
        thresholds.val_accepted_accuracy,
        "reached" if thresholds.target_reached else "not reached",
    )
    return thresholds.__dict__


@task(name="guard-test-set", cache_policy=NONE, **TIMED)
def guard_test_set(cfg, rows: list[SplitSample], run_dir: Path) -> GuardedTestSet:
    """The golden test split the gate compares on: any test file the production model or this
    run's model trained or validated on (by content) is left out for both, and named."""
    logger = get_run_logger()
    manifest = run_dir / "manifest.csv"
    trained_on: dict[str, dict | None] = {"this run's model": manifest_splits(manifest)}
    tag = production_tag(cfg.package.model_name)
    if tag is not None:
        try:
            champion_manifest = verify_model(tag) / MANIFEST_FILE
        except (RegistryError, OSError) as exc:
            logger.warning("champion %s: %s", tag, exc)
        else:
            trained_on[f"champion {tag}"] = (
                manifest_splits(champion_manifest) if champion_manifest.exists() else None
            )
    guarded = guard(rows, manifest_hashes(manifest), trained_on)
    (run_dir / "test_set.json").write_text(json.dumps(guarded.to_dict(), indent=2))
    (logger.warning if guarded.leaked or guarded.unknown else logger.info)(
        "comparing on %s", guarded.note
    )
    return guarded


@task(name="evaluate-model", cache_policy=NONE, **TIMED)
def evaluate_model(cfg, model_dir: Path, rows: list[SplitSample], run_dir: Path) -> Evaluation:
    """The new model (challenger) on the test split, through the serving code path."""
    result = evaluate_model_dir(
        model_dir,
        select(rows, "test"),
        run_dir / "evaluation",
        cfg.train.batch_size,
        cfg.eval.plot_count,
    )
    create_markdown_artifact(
        markdown=result.markdown(), key="test-metrics", description="Test split metrics"
    )
    get_run_logger().info("test metrics %s", {k: round(v, 4) for k, v in result.headline().items()})
    return result


@task(name="evaluate-champion", cache_policy=NONE, **TIMED)
def evaluate_champion(cfg, challenger_dir: Path, rows: list[SplitSample], run_dir: Path) -> dict:
    """The production model re-evaluated on the challenger's test split, in this run.

    Returns {"tag", "evaluation", "note"}: no tag when there is no production model yet; no
    evaluation (and a note saying why) when it cannot be compared with the challenger.
    """
    logger = get_run_logger()
    tag = production_tag(cfg.package.model_name)
    if tag is None:
        logger.info("no production model yet: the absolute thresholds alone decide")
        return {"tag": None, "evaluation": None, "note": None}
    try:
        champion_dir = verify_model(tag)
        champion_classes = ModelInfo.load(champion_dir).classes
    except (RegistryError, OSError, ValueError) as exc:
        note = f"champion {tag} could not be evaluated: {exc}"
        logger.warning(note)
        return {"tag": tag, "evaluation": None, "note": note}
    classes = ModelInfo.load(challenger_dir).classes
    if champion_classes != classes:
        note = (
            f"champion {tag} predicts other classes ({', '.join(champion_classes)}): not comparable"
        )
        logger.warning(note)
        return {"tag": tag, "evaluation": None, "note": note}
    # Read-only on the store: the figures go to the run folder, never into the model's folder.
    result = evaluate(
        Predictor.load(champion_dir),
        select(rows, "test"),
        cfg.train.batch_size,
        plot_dir=run_dir / "champion_evaluation",
        plot_count=cfg.eval.plot_count,
    )
    result.save(run_dir / "champion_evaluation")
    logger.info(
        "champion %s on the same test split: %s",
        tag,
        {k: round(v, 4) for k, v in result.headline().items()},
    )
    return {"tag": tag, "evaluation": result, "note": None}


@task(name="gate", cache_policy=NONE, **TIMED)
def apply_gate(
    cfg,
    evaluation: Evaluation,
    champion: dict,
    run_dir: Path,
    test_set: GuardedTestSet | None = None,
) -> GateDecision:
    """Absolute floors, then not worse than the champion beyond the tolerance. Never raises on a
    rejection: a rejected challenger is a normal outcome, recorded with every reason."""
    champion_eval = champion["evaluation"]
    decision = decide(
        evaluation.metrics,
        cfg.gate,
        champion_eval.metrics if champion_eval else None,
        champion["tag"],
        champion["note"],
    )
    decision.promoted = decision.passed and cfg.gate.promote
    if test_set is not None:
        decision.test_set, decision.test_set_note = test_set.to_dict(), test_set.note
    (run_dir / "gate.json").write_text(json.dumps(decision.to_dict(), indent=2))
    create_markdown_artifact(
        markdown=decision.markdown(),
        key="gate-decision",
        description="Promotion decision with every check",
    )
    get_run_logger().info(decision.message)
    return decision


@task(name="write-report", cache_policy=NONE, **TIMED)
def write_evaluation_report(
    cfg,
    evaluation: Evaluation,
    champion: dict,
    decision: GateDecision,
    model_tag: str,
    run_dir: Path,
) -> dict:
    """The page a person reads: the decision and its reasons, champion beside challenger, figures."""
    champion_eval = champion["evaluation"]
    training_file = run_dir / "model" / "training.json"
    paths = write_report(
        run_dir / "report",
        evaluation,
        champion_eval,
        decision,
        history=load_history(training_file) if training_file.exists() else None,
        title=f"defectflow: {model_tag}",
        info={
            "model": model_tag,
            "champion": champion["tag"] or "none (first model)",
            "run": run_dir.name,
            "serving format": ModelInfo.load(run_dir / "model").serving_format,
            "data": str(cfg.data.root),
            "test images": evaluation.metrics["n_images"],
            "compared on": decision.test_set_note or "the run's test split",
        },
        error_count=cfg.eval.plot_count,
    )
    create_markdown_artifact(
        markdown=summary_markdown(
            evaluation, champion_eval, decision, title=f"{model_tag}: evaluation"
        )
        + f"\n\nFull report: `{paths['html']}`",
        key="evaluation-report",
        description="Decision, metrics, champion beside challenger",
    )
    create_table_artifact(
        table=metrics_table_rows(evaluation, champion_eval),
        key="metrics-comparison",
        description=f"Test split metrics of {model_tag} beside the champion {champion['tag']}",
    )
    get_run_logger().info("report: %s", paths["html"])
    return {k: str(v) for k, v in paths.items()}


@task(name="assess-stored-model", cache_policy=NONE)
def assess_stored_model(tag: str | None, overrides: list[str]) -> dict:
    """A stored model (default: production) on the test split of its data, production beside it."""
    from defectflow.evaluation.champion import assess_stored_model as assess

    a = assess(tag, overrides)
    title = f"{a.tag} ({a.stage}) on {a.result.metrics['n_images']} test images of {a.data_root}"
    create_markdown_artifact(
        markdown=summary_markdown(a.result, a.champion, a.decision, title=title)
        + f"\n\nFull report: `{a.report['html']}`",
        key="evaluation-report",
        description=f"Re-evaluation of {a.tag}",
    )
    create_table_artifact(
        table=metrics_table_rows(a.result, a.champion),
        key="metrics-comparison",
        description=f"Test split metrics of {a.tag} beside production {a.champion_tag}",
    )
    get_run_logger().info(
        "%s: %s; report %s",
        a.tag,
        {k: round(v, 4) for k, v in a.result.headline().items()},
        a.report["html"],
    )
    return {
        "model": a.tag,
        "stage": a.stage,
        "data_root": a.data_root,
        "metrics": a.result.headline(),
        "production": a.champion_tag,
        "production_metrics": a.champion.headline() if a.champion else None,
        "gate": a.decision.message if a.decision else None,
        "report": str(a.report["html"]),
    }


@task(name="summarize-results", cache_policy=NONE)
def summarize_results(runs: list[dict], out_dir: Path) -> dict:
    """Mean ± std over the runs, with their coverage and confusion matrices from their run
    folders and their stage times, into out_dir/results.{md,csv,json}."""
    runs = results.with_test_figures(runs)
    summary = results.write(runs, out_dir)
    create_markdown_artifact(
        markdown=results.full_markdown(runs, summary),
        key="reproduce-results",
        description=f"mean ± std over split seeds; files in {out_dir}",
    )
    get_run_logger().info(
        "results over %d seeds:\n%s", len(runs), (out_dir / "results.md").read_text()
    )
    return summary


@task(name="check-drift", cache_policy=NONE)
def check_drift(cfg) -> dict:
    """Production's answers of the last `drift.window_hours` (the prediction log) beside the
    production model's answers on its validation split; the `drift` (Markdown) and
    `drift-checks` (table) artifacts, the chart and a page in a run folder of its own. Judges,
    never decides: nothing here changes what trains or serves."""
    from defectflow.evaluation.drift import check_production_drift
    from defectflow.orchestration.runs import new_run_id, open_run_dir

    logger = get_run_logger()
    if not cfg.drift.enabled:
        logger.info("drift check off (drift.enabled=false)")
        return {"headline": "drift check off", "drifted": [], "answers": 0, "checks": {}}
    report = check_production_drift(cfg)
    run_dir, _ = open_run_dir(cfg, f"drift-{new_run_id()}")
    paths = report.save(run_dir)
    create_markdown_artifact(
        markdown=report.markdown() + f"\n\nPage: `{paths['html']}`",
        key="drift",
        description="Production's recent answers beside the validation split",
    )
    if report.window is not None:
        create_table_artifact(
            table=report.table_rows(),
            key="drift-checks",
            description=f"Drift checks of {report.model} over the last "
            f"{cfg.drift.window_hours:g} h",
        )
    logger.info("drift: %s (%s)", report.headline(), paths["html"])
    return {**report.summary(), "page": str(paths["html"])}
