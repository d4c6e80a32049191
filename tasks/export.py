"""Export task: the compact TensorFlow Lite artifact, its parity check and the serving format."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from defectflow.data.split import SplitSample, select
from defectflow.orchestration.stage_times import TIMED
from defectflow.training.export import export_compact, markdown


@task(name="export-compact-model", cache_policy=NONE, **TIMED)
def export_compact_model(cfg, model_dir: Path, rows: list[SplitSample], run_dir: Path) -> dict:
    """Export `model_dir` to TFLite, check parity with Keras on the test split and record the
    serving format in its model.json (see `defectflow.training.export`); run_dir/export.json keeps the
    figures. Returns {"format": "keras" | "tflite", ...the summary}."""
    logger = get_run_logger()
    if cfg.export.format == "none":
        if cfg.export.serve == "tflite":
            raise ValueError(
                "export.serve=tflite but export.format=none: there is no TFLite artifact to serve"
            )
        logger.info("export.format=none: no compact artifact, serving the Keras model")
        return {"format": "keras"}
    summary = export_compact(model_dir, select(rows, "test"), cfg.export, cfg.train.batch_size)
    (run_dir / "export.json").write_text(json.dumps(summary, indent=2))
    create_markdown_artifact(
        markdown=markdown(summary),
        key="compact-artifact",
        description="TFLite export: sizes, parity with Keras on the test split, serving format",
    )
    parity = summary["parity"]
    logger.info(
        "TFLite %s: %g MB (Keras %g MB); parity %s (class agreement %.4f, |ΔDice| %.4f); serving %s (%s)",
        summary["tflite"]["quantization"],
        summary["tflite"]["size_mb"],
        summary["keras_size_mb"],
        "passed" if parity["passed"] else "FAILED",
        parity["class_agreement"],
        parity["dice_difference"],
        summary["format"],
        summary["reason"],
    )
    return summary
