"""Packaging task: the model store (with metrics and config as metadata), then the Bento."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from defectflow.config import REPO_ROOT, resolve_path, to_yaml
from defectflow.evaluation import Evaluation
from defectflow.registry import build_bento, save_model


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@task(name="package-model", cache_policy=NONE, retries=1, retry_delay_seconds=5)
def package_model(cfg, model_dir: Path, evaluation: Evaluation, run_dir: Path) -> dict:
    training = json.loads((model_dir / "training.json").read_text())
    metadata = {
        "metrics": evaluation.headline(),
        "classes": evaluation.metrics["classes"],
        "input_size": int(cfg.model.input_size),
        "config_sha256": _sha256(to_yaml(cfg).encode()),
        "manifest_sha256": _sha256((run_dir / "manifest.csv").read_bytes()),
        "data_root": str(resolve_path(cfg.data.root)),
        "run_dir": str(run_dir),
        "hyperparameters": training["hyperparameters"],
        "training_seconds": round(training["seconds"], 1),
        "device": training["device"],
    }
    model_tag = save_model(model_dir, cfg.package.model_name, metadata, labels={"stage": "candidate"})
    bento_tag = None
    if cfg.package.build_bento:
        bento_tag = build_bento(model_tag, REPO_ROOT / cfg.package.bentofile, REPO_ROOT)
    summary = {"model_tag": model_tag, "bento_tag": bento_tag}
    (run_dir / "package.json").write_text(json.dumps(summary, indent=2))
    create_markdown_artifact(
        markdown=f"model `{model_tag}` in the BentoML store; bento `{bento_tag}`", key="package"
    )
    get_run_logger().info("packaged model %s, bento %s", model_tag, bento_tag)
    return summary
