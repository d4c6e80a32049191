"""Re-evaluating a stored model on the test split of some data, with production beside it.

Used by `defectflow evaluate --model TAG` and by the `evaluate` Prefect deployment. It never
writes to the model store: figures and the report go to an output folder.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from defectflow.artifacts import CONFIG_FILE
from defectflow.config import from_yaml
from defectflow.data.mvtec import class_names, scan_dataset
from defectflow.data.split import select, split_dataset
from defectflow.data.validation import image_facts, sha256_by_path
from defectflow.evaluation.evaluate import Evaluation, evaluate
from defectflow.evaluation.gate import GateDecision, decide
from defectflow.evaluation.report import load_history, write_report
from defectflow.inference.predictor import Predictor
from defectflow.registry import (
    DEFAULT_MODEL_NAME,
    IncompleteModel,
    RegistryError,
    production_tag,
    resolve_tag,
    stage_of,
    verify_model,
)


@dataclass
class Assessment:
    tag: str
    stage: str | None
    data_root: str
    result: Evaluation
    out_dir: Path
    report: dict
    champion_tag: str | None = None
    champion: Evaluation | None = None
    decision: GateDecision | None = None


def load_predictor(path: Path, tag: str) -> Predictor:
    try:
        return Predictor.load(path)
    except Exception as exc:  # noqa: BLE001 - any loader failure means the same to the user
        raise IncompleteModel(
            f"model {tag} cannot be loaded: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from None


def write_assessment_report(
    out: Path,
    result: Evaluation,
    champion: Evaluation | None,
    decision,
    title: str,
    champion_tag: str | None = None,
    history_file: Path | None = None,
) -> dict:
    """The report of a stored model assessed outside a pipeline run (`defectflow evaluate`,
    the `evaluate` deployment); a pipeline run's report is written by its `write-report` task."""
    info = {
        "evaluated": title,
        "production model": champion_tag or "none",
        "test images": result.metrics["n_images"],
    }
    history = load_history(history_file) if history_file and history_file.exists() else None
    return write_report(
        out, result, champion, decision, history=history, title=f"defectflow: {title}", info=info
    )


def assess_stored_model(
    tag: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    out: Path | None = None,
    name: str = DEFAULT_MODEL_NAME,
) -> Assessment:
    """Model `tag` (default: production) on the test split of its config's data.root, after
    `key=value` overrides (e.g. data.root=/new/data). Production is evaluated beside it and the
    gate's decision shown, as a challenger would be judged."""
    production = production_tag(name)
    if tag is None and production is None:
        raise RegistryError("no production model: give a model tag (see `defectflow models list`)")
    tag = resolve_tag(tag or production)
    model_path = verify_model(tag)
    cfg = from_yaml((model_path / CONFIG_FILE).read_text())
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    predictor = load_predictor(model_path, tag)
    samples = scan_dataset(cfg.data.root, cfg.data.good_class)
    data_classes = class_names(samples, cfg.data.good_class)
    if sorted(data_classes) != sorted(predictor.classes):
        raise RegistryError(
            f"model {tag} predicts {', '.join(predictor.classes)} but {cfg.data.root} has "
            f"classes {', '.join(data_classes)}"
        )
    home = Path(os.environ["DEFECTFLOW_HOME"])
    split = split_dataset(
        samples,
        sha256_by_path(image_facts(samples, cfg.data.good_class)),
        cfg.data.split,
        home / "manifests",
    )
    test = select(split.rows, "test")
    if not test:
        raise RegistryError(f"the split of {cfg.data.root} has no test images")
    out = out or home / "evaluations" / f"{tag.replace(':', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = evaluate(
        predictor, test, cfg.train.batch_size, plot_dir=out, plot_count=cfg.eval.plot_count
    )
    result.save(out)
    champion, decision = None, None
    if production and production != tag:  # shown beside it, as the gate would compare them
        champion_predictor = load_predictor(verify_model(production), production)
        if sorted(champion_predictor.classes) == sorted(predictor.classes):
            champion = evaluate(champion_predictor, test, cfg.train.batch_size)
            decision = decide(result.metrics, cfg.gate, champion.metrics, production)
    report = write_assessment_report(
        out,
        result,
        champion,
        decision,
        f"model {tag}",
        champion_tag=production,
        history_file=model_path / "training.json",
    )
    return Assessment(
        tag=tag,
        stage=stage_of(tag),
        data_root=str(cfg.data.root),
        result=result,
        out_dir=out,
        report=report,
        champion_tag=production if champion else None,
        champion=champion,
        decision=decision,
    )
