"""`defectflow data synth`, `defectflow data preview`, `defectflow validate`: the dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from defectflow.cli.common import configurable


def add_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="dataset commands")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = configurable(
        data_sub.add_parser("synth", help="write the synthetic MVTec-layout dataset")
    )
    synth.add_argument(
        "--overwrite", action="store_true", help="replace an existing synthetic dataset"
    )
    synth.set_defaults(handler=cmd_synth)
    preview = configurable(
        data_sub.add_parser("preview", help="write a grid PNG of augmented image/mask pairs")
    )
    preview.add_argument(
        "--out", type=Path, default=None, help="PNG path (default: <home>/augmentation_preview.png)"
    )
    preview.set_defaults(handler=cmd_preview)
    validate = configurable(
        sub.add_parser("validate", help="validate data.root with Great Expectations")
    )
    validate.set_defaults(handler=cmd_validate)


def cmd_synth(args) -> int:
    from defectflow.config import load_config
    from defectflow.data.synthetic import generate_dataset

    cfg = load_config(args.config, args.overrides)
    s = cfg.data.synth
    out = Path(s.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"synthetic dataset already at {out} (use --overwrite to regenerate)")
        return 0
    root = generate_dataset(
        out,
        image_size=s.image_size,
        n_train_good=s.n_train_good,
        n_test_good=s.n_test_good,
        n_per_defect=s.n_per_defect,
        seed=s.seed,
        overwrite=args.overwrite,
    )
    print(f"synthetic dataset written to {root}")
    return 0


def cmd_preview(args) -> int:
    from defectflow.config import load_config
    from defectflow.data.augment import JointAugmentation
    from defectflow.data.dataset import load_split, spread_over_classes
    from defectflow.data.mvtec import class_names, scan_dataset
    from defectflow.evaluation.plots import augmentation_preview, save_rgb

    cfg = load_config(args.config, args.overrides)
    samples = scan_dataset(cfg.data.root, cfg.data.good_class)
    shown = load_split(
        spread_over_classes(samples, cfg.augment.preview_count),
        class_names(samples, cfg.data.good_class),
        cfg.model.input_size,
    )
    grid = augmentation_preview(
        JointAugmentation(cfg.augment, seed=cfg.train.seed), shown.images, shown.masks, len(shown)
    )
    out = save_rgb(grid, args.out or Path(cfg.paths.home) / "augmentation_preview.png")
    print(f"augmentation preview written to {out}")
    return 0


def cmd_validate(args) -> int:
    """The same gate as the flow: facts, split (with leakage checks), suite, Data Docs."""
    from defectflow.config import load_config
    from defectflow.data.mvtec import class_counts, scan_training_data
    from defectflow.data.split import split_dataset
    from defectflow.data.validation import (
        image_facts,
        sha256_by_path,
        validate_dataset,
        with_splits,
    )

    cfg = load_config(args.config, args.overrides)
    samples = scan_training_data(cfg.data.root, cfg.data.good_class, cfg.data.incoming or None)
    facts = image_facts(samples, cfg.data.good_class)
    home = Path(cfg.paths.home)
    split = split_dataset(samples, sha256_by_path(facts), cfg.data.split, home / "manifests")
    out = home / "validation"
    result = validate_dataset(
        with_splits(facts, split.rows),
        cfg.validation,
        class_counts(samples),
        data_docs_dir=out / "data_docs",
        facts_csv=out / "image_facts.csv",
    )
    print(result.summary_markdown())
    print(f"\nData Docs: {result.statistics.get('data_docs')}")
    if split.fingerprint:
        print(f"data version: {split.fingerprint}")
    if split.changes is not None:
        print(split.changes.summary())
        print(f"test set (golden): version {split.test_set.version}, {split.test_set.size} images")
    if not result.success:
        print(result.message(), file=sys.stderr)
        return 1
    if split.problem:
        print(f"defectflow: the data cannot be split: {split.problem}", file=sys.stderr)
        return 1
    return 0
