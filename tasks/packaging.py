"""Registry tasks: save the model with everything needed to trust it, promote it, build the Bento."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from omegaconf import OmegaConf
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from defectflow.artifacts import MANIFEST_FILE, ModelInfo
from defectflow.config import REPO_ROOT, resolve_path, to_yaml
from defectflow.evaluation.evaluate import Evaluation
from defectflow.evaluation.gate import GateDecision
from defectflow.orchestration.stage_times import TIMED
from defectflow.registry import build_bento, code_revision, promote, save_model, sha256_file


@task(name="register-model", cache_policy=NONE, retries=1, retry_delay_seconds=5, **TIMED)
def register_model(
    cfg,
    model_dir: Path,
    evaluation: Evaluation,
    decision: GateDecision,
    data_fingerprint: str,
    run_dir: Path,
) -> str:
    """Save the model to the store as a candidate, with its metrics, config, data and gate decision."""
    training = json.loads((model_dir / "training.json").read_text())
    manifest = (
        sha256_file(run_dir / "manifest.csv") if (run_dir / "manifest.csv").exists() else None
    )
    if manifest:  # the split it was trained with, for later gates' leakage checks
        shutil.copyfile(run_dir / "manifest.csv", model_dir / MANIFEST_FILE)
    info = ModelInfo.load(model_dir)
    metadata = {
        "metrics": evaluation.headline(),
        "evaluation": {k: v for k, v in evaluation.metrics.items() if k != "classes"},
        "classes": info.classes,
        # The anomaly score's memory bank and threshold (absent: no anomaly head).
        "anomaly": info.anomaly,
        "input_size": int(cfg.model.input_size),
        "serving_format": info.serving_format,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "config_sha256": hashlib.sha256(to_yaml(cfg).encode()).hexdigest(),
        "data_root": str(resolve_path(cfg.data.root)),
        "data_fingerprint": data_fingerprint,
        "manifest_sha256": manifest,
        "code_revision": code_revision(),
        "run_dir": str(run_dir),
        "hyperparameters": training["hyperparameters"],
        "training_seconds": round(training["seconds"], 1),
        "device": training["device"],
        "parent": decision.champion,
        "gate": decision.to_dict(),
        "report": str(run_dir / "report" / "report.html"),
    }
    tag = save_model(model_dir, cfg.package.model_name, metadata)
    get_run_logger().info("saved model %s to the store (candidate)", tag)
    return tag


@task(
    name="promote-model", cache_policy=NONE, retries=2, retry_delay_seconds=10, **TIMED
)  # promotion is idempotent
def promote_model(cfg, model_tag: str, decision: GateDecision, run_dir: Path) -> dict:
    """Promote a challenger the gate passed; build the Bento that serves it."""
    logger = get_run_logger()
    summary = {
        "model_tag": model_tag,
        "promoted": False,
        "bento_tag": None,
        "decision": decision.message,
    }
    if decision.promoted:
        promote(model_tag, reason=decision.message)
        summary["promoted"] = True
        logger.info("%s is now the production model", model_tag)
        if cfg.package.build_bento:
            summary["bento_tag"] = build_bento(
                model_tag, REPO_ROOT / cfg.package.bentofile, REPO_ROOT
            )
            logger.info("built bento %s", summary["bento_tag"])
    (run_dir / "package.json").write_text(json.dumps(summary, indent=2))
    create_markdown_artifact(
        markdown=f"**{decision.message}**\n\nmodel `{model_tag}`; bento `{summary['bento_tag']}`",
        key="promotion",
        description="What the registry did with the new model",
    )
    return summary


@task(name="change-stage", cache_policy=NONE)
def change_stage(action: str, tag: str | None, reason: str, name: str = "defectflow") -> dict:
    """promote TAG | rollback (the previous production model returns) | archive TAG, recorded
    in the registry's history with the reason and the user."""
    from defectflow import registry

    if action in ("promote", "archive") and not tag:
        raise ValueError(f"{action} needs a model tag (see `defectflow models list`)")
    if action == "promote":
        event = registry.promote(tag, reason=reason)
    elif action == "rollback":
        event = registry.rollback(name, reason=reason)
    elif action == "archive":
        event = registry.archive(tag, reason=reason)
    else:
        raise ValueError(f"action must be promote, rollback or archive, got {action!r}")
    create_markdown_artifact(
        markdown=f"**{action}**: `{event['tag']}` (previous production: `{event['previous'] or 'none'}`)\n\n"
        f"reason: {event['reason']} — by {event['user']} at {event['time']}",
        key="registry-change",
        description="What the registry did",
    )
    get_run_logger().info(
        "%s %s (previous production %s): %s",
        action,
        event["tag"],
        event["previous"],
        event["reason"],
    )
    return event


@task(name="build-bento", cache_policy=NONE, retries=2, retry_delay_seconds=10)
def build_production_bento(name: str = "defectflow") -> str | None:
    """The Bento serving the current production model (built once per model; reused after)."""
    from defectflow.registry import bento_of, production_tag

    tag = production_tag(name)
    if tag is None:
        return None
    bento = bento_of(tag) or build_bento(tag, REPO_ROOT / "bentofile.yaml", REPO_ROOT)
    get_run_logger().info("bento %s serves %s", bento, tag)
    return bento


@task(name="production-data-version", cache_policy=NONE)
def production_data_version(cfg) -> dict:
    """The data version the production model was trained on: {"tag", "data_version"} (None
    when there is no production model yet)."""
    from defectflow.registry import model_metadata, production_tag

    tag = production_tag(cfg.package.model_name)
    version = model_metadata(tag).get("data_fingerprint") if tag else None
    get_run_logger().info(
        "production model %s was trained on data version %s",
        tag or "none",
        version[:12] if version else "none",
    )
    return {"tag": tag, "data_version": version}
