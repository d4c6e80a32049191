"""Data tasks: load the config, scan, validate (Great Expectations), split, augment."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from defectflow.config import load_config
from defectflow.data.augment import JointAugmentation, augmentation_preview
from defectflow.data.dataset import load_split
from defectflow.data.mvtec import class_counts, class_names, scan_dataset
from defectflow.data.split import SplitSample, select, stratified_split, write_manifest
from defectflow.plots import save_rgb
from defectflow.runs import new_run_dir
from defectflow.training import PreparedData
from defectflow.validation import image_facts, require_valid, validate_dataset


@task(name="load-config", cache_policy=NONE)
def load_run_config(config: str, overrides: list[str]):
    cfg = load_config(config, overrides)
    run_dir = new_run_dir(cfg)
    get_run_logger().info("run folder %s (config %s, overrides %s)", run_dir, config, overrides or "none")
    return cfg, run_dir


@task(name="validate-data", cache_policy=NONE)
def validate_data(cfg, run_dir: Path):
    samples = scan_dataset(cfg.data.root, cfg.data.good_class)
    facts = image_facts(samples, cfg.data.good_class)
    out = run_dir / "validation"
    out.mkdir(parents=True, exist_ok=True)
    facts.to_csv(out / "image_facts.csv", index=False)
    result = validate_dataset(facts, cfg.validation, class_counts(samples), data_docs_dir=out / "data_docs")
    (out / "summary.md").write_text(result.summary_markdown())
    create_markdown_artifact(
        markdown=result.summary_markdown(), key="data-validation", description="Great Expectations gate"
    )
    require_valid(result)
    get_run_logger().info("data valid: %d images, classes %s", len(samples), class_counts(samples))
    return samples


@task(name="split-data", cache_policy=NONE)
def split_data(cfg, samples, run_dir: Path) -> list[SplitSample]:
    s = cfg.data.split
    rows = stratified_split(samples, s.train, s.val, s.test, s.seed)
    write_manifest(rows, run_dir / "manifest.csv")
    counts = {name: sum(r.split == name for r in rows) for name in ("train", "val", "test")}
    get_run_logger().info("split %s, manifest %s", counts, run_dir / "manifest.csv")
    return rows


@task(name="augment-data", cache_policy=NONE)
def augment_data(cfg, samples, rows: list[SplitSample], run_dir: Path) -> PreparedData:
    classes = list(cfg.data.classes) or class_names(samples, cfg.data.good_class)
    size = cfg.model.input_size
    train = load_split(select(rows, "train"), classes, size)
    val = load_split(select(rows, "val"), classes, size)
    augmentation = JointAugmentation(cfg.augment, seed=cfg.train.seed)
    preview = augmentation_preview(augmentation, train.images, train.masks, cfg.augment.preview_count)
    save_rgb(preview, run_dir / "augmentation_preview.png")
    get_run_logger().info(
        "augmentation %s on %d training images (preview %s)",
        augmentation.describe(), len(train), run_dir / "augmentation_preview.png",
    )
    return PreparedData(train, val, classes, augmentation)
