"""Registry tasks: save the model with everything needed to trust it, promote it, build the Bento."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import OmegaConf
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from defectflow.config import REPO_ROOT, resolve_path, to_yaml
from defectflow.evaluation import Evaluation
from defectflow.gate import GateDecision
from defectflow.inference import ModelInfo
from defectflow.registry import build_bento, code_revision, promote, save_model, sha256_file


@task(name="register-model", cache_policy=NONE, retries=1, retry_delay_seconds=5)
def register_model(cfg, model_dir: Path, evaluation: Evaluation, decision: GateDecision,
                   data_fingerprint: str, run_dir: Path) -> str:
    """Save the model to the store as a candidate, with its metrics, config, data and gate decision."""
    training = json.loads((model_dir / "training.json").read_text())
    manifest = sha256_file(run_dir / "manifest.csv") if (run_dir / "manifest.csv").exists() else None
    metadata = {
        "metrics": evaluation.headline(),
        "evaluation": {k: v for k, v in evaluation.metrics.items() if k != "classes"},
        "classes": evaluation.metrics["classes"],
        "input_size": int(cfg.model.input_size),
        "serving_format": ModelInfo.load(model_dir).serving_format,
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


@task(name="promote-model", cache_policy=NONE)
def promote_model(cfg, model_tag: str, decision: GateDecision, run_dir: Path) -> dict:
    """Promote a challenger the gate passed; build the Bento that serves it."""
    logger = get_run_logger()
    summary = {"model_tag": model_tag, "promoted": False, "bento_tag": None, "decision": decision.message}
    if decision.promoted:
        promote(model_tag, reason=decision.message)
        summary["promoted"] = True
        logger.info("%s is now the production model", model_tag)
        if cfg.package.build_bento:
            summary["bento_tag"] = build_bento(model_tag, REPO_ROOT / cfg.package.bentofile, REPO_ROOT)
            logger.info("built bento %s", summary["bento_tag"])
    (run_dir / "package.json").write_text(json.dumps(summary, indent=2))
    create_markdown_artifact(
        markdown=f"**{decision.message}**\n\nmodel `{model_tag}`; bento `{summary['bento_tag']}`", key="promotion",
        description="What the registry did with the new model")
    return summary
