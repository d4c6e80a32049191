"""Data tasks: load the config, scan, validate (Great Expectations), split, augment."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

from omegaconf import OmegaConf
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.utilities.hashing import hash_objects

from defectflow.config import load_config, resolve_path
from defectflow.data.augment import JointAugmentation
from defectflow.data.dataset import load_split, spread_over_classes
from defectflow.data.mvtec import class_counts, class_names, scan_training_data
from defectflow.data.split import (
    SplitOutcome,
    dataset_fingerprint,
    listing_signature,
    select,
    split_dataset,
    write_manifest,
)
from defectflow.data.validation import (
    ValidationResult,
    image_facts,
    require_valid,
    sha256_by_path,
    suite_paths,
    validate_dataset,
    with_splits,
)
from defectflow.evaluation.plots import augmentation_preview, save_rgb
from defectflow.orchestration.runs import open_run_dir
from defectflow.orchestration.stage_times import TIMED
from defectflow.training.train import PreparedData

CACHE_FOR = timedelta(days=30)


@task(name="load-config", cache_policy=NONE, **TIMED)
def load_run_config(config: str, overrides: list[str], run_id: str | None = None):
    """The merged config and the run folder; an existing run id resumes that run."""
    cfg = load_config(config, overrides)
    run_dir, resumed = open_run_dir(cfg, run_id)
    get_run_logger().info(
        "%s run folder %s (config %s, overrides %s)",
        "resuming" if resumed else "new",
        run_dir,
        config,
        overrides or "none",
    )
    return cfg, run_dir, resumed


@task(name="load-config", cache_policy=NONE)
def load_config_only(config: str, overrides: list[str]):
    """The merged config, with no run folder (for flows that may not train)."""
    return load_config(config, overrides)


def _data_key(cfg) -> str:
    incoming = resolve_path(cfg.data.incoming) if cfg.data.incoming else ""
    return f"{resolve_path(cfg.data.root)}|{incoming}|{cfg.data.good_class}"


def _listing(cfg) -> str:
    return listing_signature(resolve_path(cfg.data.root)) + (
        listing_signature(resolve_path(cfg.data.incoming)) if cfg.data.incoming else ""
    )


# Deterministic steps are cached by what they read, with persisted results (under
# $PREFECT_HOME/storage), so a retrain of unchanged data, or a re-run after a crash, skips them.
@task(
    name="fingerprint-data",
    **TIMED,
    persist_result=True,
    cache_expiration=CACHE_FOR,
    cache_key_fn=lambda _, p: (
        "fingerprint:"
        + hash_objects(
            _listing(p["cfg"]), _data_key(p["cfg"]), OmegaConf.to_container(p["cfg"].data.split)
        )
    ),
)
def fingerprint_data(cfg) -> str:
    """The data version: a hash of every file's class, name and bytes, and the split settings.
    Cached by the folder listing (path, size, mtime), so unchanged data is not read again."""
    fingerprint = dataset_fingerprint(
        resolve_path(cfg.data.root),
        cfg.data.good_class,
        cfg.data.split,
        resolve_path(cfg.data.incoming) if cfg.data.incoming else None,
    )
    get_run_logger().info("data version %s of %s", fingerprint[:12], cfg.data.root)
    return fingerprint


@task(
    name="scan-data",
    **TIMED,
    persist_result=True,
    cache_expiration=CACHE_FOR,
    cache_key_fn=lambda _, p: "scan:" + hash_objects(p["data_version"], _data_key(p["cfg"])),
)
def scan_data(cfg, data_version: str):
    """Find the images and masks and read each file once into the facts table (cached by the
    data version)."""
    samples = scan_training_data(cfg.data.root, cfg.data.good_class, cfg.data.incoming or None)
    facts = image_facts(samples, cfg.data.good_class)
    reviewed = sum(s.origin.startswith("incoming/") for s in samples)
    get_run_logger().info(
        "found %d images in %s%s: %s",
        len(samples),
        cfg.data.root,
        f" ({reviewed} reviewed ones from {cfg.data.incoming})" if reviewed else "",
        class_counts(samples),
    )
    return samples, facts


@task(name="split-data", cache_policy=NONE, **TIMED)
def split_data(cfg, samples, facts, run_dir: Path) -> SplitOutcome:
    """The split of this data version (reused when the same data was split before)."""
    sha256 = sha256_by_path(facts)
    outcome = split_dataset(samples, sha256, cfg.data.split, Path(cfg.paths.home) / "manifests")
    log = get_run_logger()
    if outcome.problem:
        log.warning("no split yet: %s", outcome.problem)
        return outcome
    write_manifest(outcome.rows, run_dir / "manifest.csv", sha256)
    (run_dir / "data_fingerprint.txt").write_text(outcome.fingerprint + "\n")
    counts = {name: sum(r.split == name for r in outcome.rows) for name in ("train", "val", "test")}
    log.info(
        "data version %s: split %s (%s), manifest %s; test set %s (%d images)\n%s",
        outcome.fingerprint[:12],
        counts,
        "reused" if outcome.reused else "new",
        run_dir / "manifest.csv",
        outcome.test_set.version,
        outcome.test_set.size,
        outcome.changes.summary(),
    )
    return outcome


def _validation_dir(cfg, data_version: str) -> Path:
    """Where the cached validation of a data version keeps its Data Docs and facts table."""
    return Path(cfg.paths.home) / "validation" / data_version[:16]


@task(
    name="check-data",
    persist_result=True,
    cache_expiration=CACHE_FOR,
    cache_key_fn=lambda _, p: (
        "validation:"
        + hash_objects(
            p["data_version"],
            _data_key(p["cfg"]),
            p["split"].fingerprint,
            p["split"].problem,
            OmegaConf.to_container(p["cfg"].validation),
            *(path.read_bytes() for path in suite_paths(p["cfg"].validation)),
        )
    ),
)
def check_data(cfg, samples, facts, split: SplitOutcome, data_version: str) -> ValidationResult:
    """The Great Expectations suite on the facts table; cached by data version, split and suite,
    with its Data Docs kept per data version under <paths.home>/validation/."""
    out = _validation_dir(cfg, data_version)
    return validate_dataset(
        with_splits(facts, split.rows),
        cfg.validation,
        class_counts(samples),
        data_docs_dir=out / "data_docs",
        facts_csv=out / "image_facts.csv",
    )


@task(name="validate-data", cache_policy=NONE, **TIMED)
def validate_data(
    cfg, samples, facts, split: SplitOutcome, data_version: str, run_dir: Path
) -> None:
    """The validation gate of this run: the (cached) result, its Data Docs copied into the run
    folder and shown in the UI; invalid data stops the run here."""
    result = check_data(cfg, samples, facts, split, data_version)
    out = run_dir / "validation"
    out.mkdir(parents=True, exist_ok=True)
    docs = result.statistics.get("data_docs")
    if docs and Path(docs).exists():
        shutil.copytree(Path(docs).parent, out / "data_docs", dirs_exist_ok=True)
        docs = str(out / "data_docs" / Path(docs).name)
    facts_csv = _validation_dir(cfg, data_version) / "image_facts.csv"
    if facts_csv.exists():
        shutil.copy2(facts_csv, out / "image_facts.csv")
    (out / "summary.md").write_text(result.summary_markdown())
    create_markdown_artifact(
        markdown=result.summary_markdown()
        + (f"\n\nData Docs: [{docs}](file://{docs})" if docs else ""),
        key="data-validation",
        description="Great Expectations gate",
    )
    require_valid(result, split.problem)
    get_run_logger().info("data valid: %d images; Data Docs %s", len(samples), docs)


@task(name="augment-data", cache_policy=NONE, **TIMED)
def augment_data(cfg, samples, split: SplitOutcome, run_dir: Path) -> PreparedData:
    rows = split.rows
    classes = list(cfg.data.classes) or class_names(samples, cfg.data.good_class)
    size = cfg.model.input_size
    data = PreparedData(select(rows, "train"), select(rows, "val"), classes)
    augmentation = JointAugmentation(cfg.augment, seed=cfg.train.seed)
    shown = load_split(
        spread_over_classes(select(rows, "train"), cfg.augment.preview_count), classes, size
    )
    preview = save_rgb(
        augmentation_preview(augmentation, shown.images, shown.masks, len(shown)),
        run_dir / "augmentation_preview.png",
    )
    create_markdown_artifact(
        markdown=f"Augmentation: {', '.join(augmentation.describe())}\n\n![preview](file://{preview})\n\n"
        f"Preview grid: `{preview}`",
        key="augmentation-preview",
    )
    get_run_logger().info(
        "augmentation %s on %d training images (preview %s)",
        augmentation.describe(),
        len(data.train_samples),
        run_dir / "augmentation_preview.png",
    )
    return data
