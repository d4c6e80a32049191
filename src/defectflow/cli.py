"""The `defectflow` command.

    defectflow data synth [key=value ...]      write the embedded synthetic dataset
    defectflow data preview [--out PNG]        grid of augmented image/mask pairs
    defectflow validate   [key=value ...]      run the Great Expectations gate on data.root
    defectflow train      [key=value ...]      run the training pipeline (a Prefect flow)
    defectflow evaluate   RUN_DIR              calibrate thresholds (val) and evaluate (test) a run's model
    defectflow reproduce  [--seeds 42 43 44]   the pipeline on several split seeds: results table
    defectflow serve      [--bento TAG]        serve a Bento over HTTP (BentoML)
    defectflow deploy     [--cron EXPR]        serve the pipeline as a deployment of a Prefect server

Every command takes `--config NAME` (a file in configs/) and trailing `key=value` overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from defectflow.environment import configure_environment

BENTO_NAME = "defectflow"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="defectflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def configurable(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", default="default", help="config name in configs/ (default: default)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        return p

    data = sub.add_parser("data", help="dataset commands")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = configurable(data_sub.add_parser("synth", help="write the synthetic MVTec-layout dataset"))
    synth.add_argument("--overwrite", action="store_true", help="replace an existing synthetic dataset")
    preview = configurable(data_sub.add_parser("preview", help="write a grid PNG of augmented image/mask pairs"))
    preview.add_argument("--out", type=Path, default=None, help="PNG path (default: <home>/augmentation_preview.png)")
    configurable(sub.add_parser("validate", help="validate data.root with Great Expectations"))
    train = configurable(sub.add_parser("train", help="run the training pipeline flow"))
    train.add_argument("--run-id", default=None,
                       help="run folder name; the id of an interrupted run resumes it (default: new)")
    evaluate = sub.add_parser("evaluate", help="calibrate and evaluate the model of a finished run again")
    evaluate.add_argument("run_dir", type=Path, help="a run folder (.defectflow/runs/<run id>)")
    evaluate.add_argument("--no-calibrate", action="store_true", help="keep the thresholds the model has")
    reproduce = configurable(sub.add_parser("reproduce", help="tune once, then train and evaluate on several "
                                                              "split seeds; mean ± std table"))
    reproduce.set_defaults(config="capsule")
    reproduce.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="data.split.seed values")
    reproduce.add_argument("--out", type=Path, default=None, help="results folder")
    serve = sub.add_parser("serve", help="serve a built Bento over HTTP")
    serve.add_argument("--bento", default=f"{BENTO_NAME}:latest", help="Bento tag (default: newest)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=3000)
    deploy = sub.add_parser("deploy", help="serve the training pipeline as a Prefect deployment")
    deploy.add_argument("--name", default="training-pipeline", help="deployment name")
    deploy.add_argument("--cron", default=None, help="schedule, e.g. '0 2 * * *' (default: none)")
    return parser


def cmd_synth(args) -> int:
    from defectflow.config import load_config
    from defectflow.data.synthetic import generate_dataset

    cfg = load_config(args.config, args.overrides)
    s = cfg.data.synth
    out = Path(s.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"synthetic dataset already at {out} (use --overwrite to regenerate)")
        return 0
    root = generate_dataset(out, image_size=s.image_size, n_train_good=s.n_train_good,
                            n_test_good=s.n_test_good, n_per_defect=s.n_per_defect, seed=s.seed,
                            overwrite=args.overwrite)
    print(f"synthetic dataset written to {root}")
    return 0


def cmd_preview(args) -> int:
    from defectflow.config import load_config
    from defectflow.data.augment import JointAugmentation, augmentation_preview
    from defectflow.data.dataset import load_split, spread_over_classes
    from defectflow.data.mvtec import class_names, scan_dataset
    from defectflow.plots import save_rgb

    cfg = load_config(args.config, args.overrides)
    samples = scan_dataset(cfg.data.root, cfg.data.good_class)
    shown = load_split(spread_over_classes(samples, cfg.augment.preview_count),
                       class_names(samples, cfg.data.good_class), cfg.model.input_size)
    grid = augmentation_preview(JointAugmentation(cfg.augment, seed=cfg.train.seed), shown.images, shown.masks,
                                len(shown))
    out = save_rgb(grid, args.out or Path(cfg.paths.home) / "augmentation_preview.png")
    print(f"augmentation preview written to {out}")
    return 0


def cmd_validate(args) -> int:
    """The same gate as the flow: facts, split (with leakage checks), suite, Data Docs."""
    from defectflow.config import load_config
    from defectflow.data.mvtec import class_counts, scan_dataset
    from defectflow.data.split import split_dataset
    from defectflow.validation import image_facts, sha256_by_path, validate_dataset, with_splits

    cfg = load_config(args.config, args.overrides)
    samples = scan_dataset(cfg.data.root, cfg.data.good_class)
    facts = image_facts(samples, cfg.data.good_class)
    home = Path(cfg.paths.home)
    split = split_dataset(samples, sha256_by_path(facts), cfg.data.split, home / "manifests")
    out = home / "validation"
    result = validate_dataset(with_splits(facts, split.rows), cfg.validation, class_counts(samples),
                              data_docs_dir=out / "data_docs", facts_csv=out / "image_facts.csv")
    print(result.summary_markdown())
    print(f"\nData Docs: {result.statistics.get('data_docs')}")
    if split.fingerprint:
        print(f"data version: {split.fingerprint}")
    if not result.success:
        print(result.message(), file=sys.stderr)
        return 1
    if split.problem:
        print(f"defectflow: the data cannot be split: {split.problem}", file=sys.stderr)
        return 1
    return 0


def _run_pipeline(args, start) -> int:
    from defectflow.config import load_config
    from defectflow.gate import GateFailed
    from defectflow.runs import RunConflict
    from defectflow.validation import DataValidationError

    load_config(args.config, args.overrides)  # fail fast, before Prefect starts, on a bad config
    try:
        summary = start()
    except (DataValidationError, GateFailed, RunConflict) as exc:
        print(f"defectflow: training stopped: {exc}", file=sys.stderr)
        return 1
    print("\nartifacts:")
    print(json.dumps(summary, indent=2))
    return 0


def cmd_train(args) -> int:
    def start():
        from flows.training import training_pipeline

        return training_pipeline(config=args.config, overrides=list(args.overrides), run_id=args.run_id)

    return _run_pipeline(args, start)


def cmd_evaluate(args) -> int:
    """The run's model on the run's own split: thresholds from val, figures on test."""
    from defectflow.calibration import calibrate_model
    from defectflow.config import from_yaml
    from defectflow.data.split import read_manifest, select
    from defectflow.evaluation import evaluate_model_dir

    run = args.run_dir
    missing = [p for p in (run / "config.yaml", run / "manifest.csv", run / "model" / "model.json") if not p.exists()]
    if missing:
        print(f"defectflow: error: {run} is not a finished run folder (missing {', '.join(map(str, missing))})",
              file=sys.stderr)
        return 2
    cfg = from_yaml((run / "config.yaml").read_text())
    rows = read_manifest(run / "manifest.csv")
    if not args.no_calibrate:  # whatever the run did: this command is how thresholds are redone
        thresholds = calibrate_model(run / "model", select(rows, "val"), cfg.train.batch_size, run / "calibration.json")
        print(thresholds.markdown() + "\n")
    result = evaluate_model_dir(run / "model", select(rows, "test"), run / "evaluation", cfg.train.batch_size,
                                cfg.eval.plot_count)
    print(result.markdown())
    print(f"\nconfusion matrix (rows: true {result.metrics['classes']}): {result.metrics['confusion_matrix']}")
    return 0


def cmd_reproduce(args) -> int:
    def start():
        from flows.reproduce import reproduce

        summary = reproduce(config=args.config, seeds=args.seeds, overrides=list(args.overrides),
                            out_dir=str(args.out) if args.out else None)
        print((Path(summary["out_dir"]) / "results.md").read_text())
        return summary

    return _run_pipeline(args, start)


def cmd_serve(args) -> int:
    """Becomes `bentoml serve` (exec): stopping this process stops the server and its workers."""
    import socket

    with socket.socket() as probe:
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            print(f"defectflow: error: cannot serve on {args.host}:{args.port}: {exc.strerror} "
                  "(another server running? pick another --port)", file=sys.stderr)
            return 2
    bentoml = Path(sys.executable).with_name("bentoml")
    command = [str(bentoml) if bentoml.exists() else "bentoml", "serve", args.bento,
               "--host", args.host, "--port", str(args.port)]
    print("$ " + " ".join(command), flush=True)
    os.execvpe(command[0], command, os.environ.copy())
    return 0  # pragma: no cover - exec does not return


def cmd_deploy(args) -> int:
    """Blocks, running flow runs that the Prefect server at PREFECT_API_URL schedules."""
    if not os.environ.get("PREFECT_API_URL"):
        print("defectflow: error: PREFECT_API_URL is not set: start a server (`prefect server start`) "
              "and export PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return 2
    from flows.training import training_pipeline

    training_pipeline.serve(name=args.name, cron=args.cron, tags=["defectflow"],
                            description="Validate, tune, train, evaluate, gate and package a defect model.")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_environment()
    from defectflow.config import ConfigError
    from defectflow.data.mvtec import DatasetError

    handlers = {"validate": cmd_validate, "train": cmd_train, "reproduce": cmd_reproduce, "evaluate": cmd_evaluate,
                "serve": cmd_serve, "deploy": cmd_deploy}
    if args.command == "data":
        handler = cmd_preview if args.data_command == "preview" else cmd_synth
    else:
        handler = handlers[args.command]
    try:
        return handler(args)
    except (ConfigError, DatasetError, FileExistsError) as exc:
        print(f"defectflow: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
