"""The `defectflow` command.

    defectflow data synth [key=value ...]      write the embedded synthetic dataset
    defectflow data preview [--out PNG]        grid of augmented image/mask pairs
    defectflow validate   [key=value ...]      run the Great Expectations gate on data.root
    defectflow train      [key=value ...]      run the training pipeline (a Prefect flow)
    defectflow evaluate   [--model TAG] [--json] evaluate a stored model (default: production) on data.root
    defectflow evaluate   RUN_DIR              calibrate thresholds (val) and evaluate (test) a run's model
    defectflow models     list | show TAG | promote TAG | rollback | archive TAG | history
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
    parser = argparse.ArgumentParser(
        prog="defectflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def configurable(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config", default="default", help="config name in configs/ (default: default)"
        )
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        return p

    data = sub.add_parser("data", help="dataset commands")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = configurable(
        data_sub.add_parser("synth", help="write the synthetic MVTec-layout dataset")
    )
    synth.add_argument(
        "--overwrite", action="store_true", help="replace an existing synthetic dataset"
    )
    preview = configurable(
        data_sub.add_parser("preview", help="write a grid PNG of augmented image/mask pairs")
    )
    preview.add_argument(
        "--out", type=Path, default=None, help="PNG path (default: <home>/augmentation_preview.png)"
    )
    configurable(sub.add_parser("validate", help="validate data.root with Great Expectations"))
    train = configurable(sub.add_parser("train", help="run the training pipeline flow"))
    train.add_argument(
        "--run-id",
        default=None,
        help="run folder name; the id of an interrupted run resumes it (default: new)",
    )
    evaluate = sub.add_parser(
        "evaluate",
        help="evaluate a stored model (default: production) on the test split of data.root "
        "(the model's own config, then key=value overrides), or the model of a run folder; "
        "writes a report",
    )
    evaluate.add_argument(
        "targets",
        nargs="*",
        metavar="RUN_DIR | key=value",
        help="a run folder, or config overrides such as data.root=/path",
    )
    evaluate.add_argument("--model", default=None, help="model tag (default: the production model)")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    evaluate.add_argument("--out", type=Path, default=None, help="report folder")
    evaluate.add_argument(
        "--no-calibrate",
        action="store_true",
        help="with a run folder: keep the thresholds the model has",
    )
    evaluate.add_argument(
        "--leave-one-out",
        action="store_true",
        help="for each defect type: train without it (config --config + key=value overrides; "
        "keep the budget small) and measure how many of its images are still flagged",
    )
    evaluate.add_argument(
        "--config",
        default="default",
        help="with --leave-one-out: config name in configs/ (default: default)",
    )
    evaluate.add_argument(
        "--types",
        nargs="+",
        default=None,
        metavar="TYPE",
        help="with --leave-one-out: only these defect types (default: all)",
    )
    predict = sub.add_parser(
        "predict",
        help="inspect image files, folders (recursively) or globs with a model: "
        "a report row per file, mask and overlay PNGs, a summary",
    )
    predict.add_argument(
        "paths", nargs="+", metavar="PATH", help="image files, folders or globs (quote them)"
    )
    predict.add_argument(
        "--model", default=None, help="model tag, or a model folder (default: the production model)"
    )
    predict.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the report and the PNGs, which mirror each input's path below the "
        "inputs' common parent folder (default: <home>/predictions/<time>)",
    )
    predict.add_argument(
        "--format",
        choices=["csv", "json"],
        default="csv",
        help="report.csv, or report.jsonl with one JSON object per line (default: csv)",
    )
    predict.add_argument(
        "--overlay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write <name>_overlay.png beside each <name>_mask.png (default: on)",
    )
    predict.add_argument(
        "--batch-size", type=int, default=8, help="images per forward pass (default: 8)"
    )
    predict.add_argument(
        "--score",
        action="store_true",
        help="the PATH is an MVTec-layout folder (test/<class>/...): compare the answers with its "
        "labels and masks and print the metrics defectflow evaluate prints",
    )
    models = sub.add_parser("models", help="the model registry: stages, promotion, rollback")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    for name, text in (
        ("list", "models with stage and metrics, newest first"),
        ("history", "promotions, rollbacks and archivals, oldest first"),
    ):
        p = models_sub.add_parser(name, help=text)
        p.add_argument("--name", default="defectflow", help="model name (default: defectflow)")
        p.add_argument("--json", action="store_true")
    show = models_sub.add_parser("show", help="everything recorded about a model")
    show.add_argument("tag")
    show.add_argument("--json", action="store_true")
    promote = models_sub.add_parser("promote", help="make a model the production model")
    promote.add_argument("tag")
    promote.add_argument("--reason", default="promoted by hand")
    rollback = models_sub.add_parser("rollback", help="restore the previous production model")
    rollback.add_argument("--name", default="defectflow")
    rollback.add_argument("--reason", default="rolled back by hand")
    archive = models_sub.add_parser("archive", help="mark a model archived")
    archive.add_argument("tag")
    archive.add_argument("--reason", default="archived by hand")
    reproduce = configurable(
        sub.add_parser(
            "reproduce",
            help="tune once, then train and evaluate on several split seeds; mean ± std table",
        )
    )
    reproduce.set_defaults(config="capsule")
    reproduce.add_argument(
        "--seeds", type=int, nargs="+", default=[42, 43, 44], help="data.split.seed values"
    )
    reproduce.add_argument("--out", type=Path, default=None, help="results folder")
    serve = sub.add_parser("serve", help="serve a built Bento over HTTP")
    serve.add_argument(
        "--bento",
        default=None,
        help="Bento tag (default: the Bento of the production model, else service.py from source)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=3000)
    up = sub.add_parser(
        "up",
        help="start a Prefect server, work pools, the deployments of prefect.yaml and a "
        "worker on this machine (only what is not running yet)",
    )
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=4200)
    up.add_argument(
        "--no-worker", action="store_true", help="start no worker (e.g. workers run elsewhere)"
    )
    sub.add_parser("down", help="stop the server and worker `defectflow up` started")
    status = sub.add_parser("status", help="what `defectflow up` started, and whether it runs")
    status.add_argument("--json", action="store_true")
    deploy = sub.add_parser("deploy", help="serve the training pipeline as a Prefect deployment")
    deploy.add_argument("--name", default="training-pipeline", help="deployment name")
    deploy.add_argument("--cron", default=None, help="schedule, e.g. '0 2 * * *' (default: none)")
    review = sub.add_parser(
        "review",
        help="review the inbox of uncertain predictions: label them into the "
        "incoming dataset, or discard them",
    )
    review.add_argument(
        "--inbox", type=Path, default=None, help="inbox folder (default: serve.inbox.path)"
    )
    review.add_argument(
        "--incoming",
        type=Path,
        default=None,
        help="dataset reviewed items go to (default: serve.inbox.incoming)",
    )
    review.add_argument(
        "--config", default="default", help="config name in configs/ (default: default)"
    )
    review_sub = review.add_subparsers(dest="review_command", required=True)
    review_list = review_sub.add_parser("list", help="pending items (oldest first)")
    review_list.add_argument(
        "--status", default="pending", choices=["pending", "reviewed", "discarded", "all"]
    )
    review_list.add_argument("--json", action="store_true")
    review_show = review_sub.add_parser(
        "show", help="one item: its prediction; --out writes image and overlay PNGs"
    )
    review_show.add_argument("id")
    review_show.add_argument(
        "--out", type=Path, default=None, help="folder for <id>.png and <id>_overlay.png"
    )
    review_show.add_argument("--json", action="store_true")
    review_accept = review_sub.add_parser(
        "accept", help="write an item into the incoming dataset as --label"
    )
    review_accept.add_argument("id")
    review_accept.add_argument(
        "--label", required=True, help="the class (one of the model's classes)"
    )
    review_accept.add_argument(
        "--mask",
        default="keep",
        help="keep (the predicted mask), clear, or a PNG file (non-zero = defect)",
    )
    review_accept.add_argument(
        "--reviewer", default=None, help="who reviewed (default: the login name)"
    )
    review_discard = review_sub.add_parser("discard", help="drop an item")
    review_discard.add_argument("id")
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
    if not result.success:
        print(result.message(), file=sys.stderr)
        return 1
    if split.problem:
        print(f"defectflow: the data cannot be split: {split.problem}", file=sys.stderr)
        return 1
    return 0


def _run_pipeline(args, start) -> int:
    from defectflow.config import load_config
    from defectflow.data.validation import DataValidationError
    from defectflow.orchestration.runs import RunConflict

    load_config(args.config, args.overrides)  # fail fast, before Prefect starts, on a bad config
    try:
        summary = start()
    except (DataValidationError, RunConflict) as exc:
        print(f"defectflow: training stopped: {exc}", file=sys.stderr)
        return 1
    print("\nartifacts:")
    print(json.dumps(summary, indent=2))
    if summary.get("decision"):  # a rejected challenger is an outcome, not an error: exit 0
        print(f"\n{summary['decision']}")
    return 0


def cmd_train(args) -> int:
    def start():
        from defectflow.orchestration.flows.training import training_pipeline

        return training_pipeline(
            config=args.config, overrides=list(args.overrides), run_id=args.run_id
        )

    return _run_pipeline(args, start)


def cmd_evaluate(args) -> int:
    """A stored model (read-only) or a run's model (thresholds redone on val), on a test split."""
    run_dirs = [Path(t) for t in args.targets if "=" not in t]
    overrides = [t for t in args.targets if "=" in t]
    if args.leave_one_out:
        if run_dirs or args.model:
            print(
                "defectflow: error: --leave-one-out trains its own models: give key=value overrides, not a run "
                "folder or --model",
                file=sys.stderr,
            )
            return 2
        return _evaluate_leave_one_out(args, overrides)
    if len(run_dirs) > 1 or (run_dirs and args.model):
        print("defectflow: error: give one run folder, or --model TAG, not both", file=sys.stderr)
        return 2
    if run_dirs:
        return _evaluate_run(args, run_dirs[0], overrides)
    return _evaluate_stored_model(args, overrides)


def _evaluate_run(args, run: Path, overrides: list[str]) -> int:
    """The run's model on the run's own split: thresholds from val, figures on test."""
    from defectflow.config import from_yaml
    from defectflow.data.split import read_manifest, select
    from defectflow.evaluation.calibration import calibrate_model
    from defectflow.evaluation.champion import write_evaluation_report
    from defectflow.evaluation.evaluate import evaluate_model_dir

    if overrides:
        print(
            "defectflow: error: a run folder is evaluated on its own split: no key=value overrides",
            file=sys.stderr,
        )
        return 2
    missing = [
        p
        for p in (run / "config.yaml", run / "manifest.csv", run / "model" / "model.json")
        if not p.exists()
    ]
    if missing:
        print(
            f"defectflow: error: {run} is not a finished run folder (missing {', '.join(map(str, missing))})",
            file=sys.stderr,
        )
        return 2
    cfg = from_yaml((run / "config.yaml").read_text())
    rows = read_manifest(run / "manifest.csv")
    if not args.no_calibrate:  # whatever the run did: this command is how thresholds are redone
        thresholds = calibrate_model(
            run / "model",
            select(rows, "val"),
            cfg.train.batch_size,
            run / "calibration.json",
            cfg.eval.temperature_scaling,
            cfg.eval.accept_target_accuracy,
            cfg.anomaly.false_alarm_rate,
        )
        if not args.json:
            print(thresholds.markdown() + "\n")
    result = evaluate_model_dir(
        run / "model",
        select(rows, "test"),
        run / "evaluation",
        cfg.train.batch_size,
        cfg.eval.plot_count,
    )
    report = write_evaluation_report(
        args.out or run / "report",
        result,
        None,
        None,
        f"run {run.name}",
        history_file=run / "model" / "training.json",
    )
    _print_evaluation(
        args,
        {"model": str(run / "model"), "stage": None, "data_root": cfg.data.root},
        result,
        None,
        report,
    )
    return 0


def _evaluate_leave_one_out(args, overrides: list[str]) -> int:
    """The leave-one-defect-type-out table, into --out (default: <home>/leave_one_out)."""
    from defectflow.config import load_config, resolve_path
    from defectflow.training.leave_one_out import leave_one_out, markdown

    cfg = load_config(args.config, overrides)
    out = args.out or resolve_path(cfg.paths.home) / "leave_one_out"
    summary = leave_one_out(cfg, out, args.types)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(markdown(summary))
        print(f"\ntable: {out / 'leave_one_out.md'}, chart: {out / 'leave_one_out.png'}")
    return 0


def _load_predictor_for(model: str | None):
    """(predictor, description) of a model folder, a model tag, or (None) the production model."""
    from defectflow.artifacts import MODEL_INFO_FILE
    from defectflow.evaluation.champion import load_predictor
    from defectflow.registry import RegistryError, production_tag, resolve_tag, verify_model

    if model and (Path(model) / MODEL_INFO_FILE).is_file():
        return load_predictor(Path(model), model), model
    if model is None:
        model = production_tag()
        if model is None:
            raise RegistryError("no production model: give --model TAG or a model folder")
    tag = resolve_tag(model)
    return load_predictor(verify_model(tag), tag), tag


def cmd_predict(args) -> int:
    """Every file behind PATH... through the model: report, PNGs and a summary. Exit 0 when at
    least one image was inspected, 1 when none could be, 2 when the model cannot be loaded."""
    import time

    from tqdm import tqdm

    from defectflow.config import resolve_path
    from defectflow.inference.inspection import (
        ReportWriter,
        collect_inputs,
        inspect_files,
        summarize,
    )

    if args.batch_size < 1:
        print("defectflow: error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    if args.score and (len(args.paths) != 1 or not (Path(args.paths[0]) / "test").is_dir()):
        print(
            "defectflow: error: --score needs one MVTec-layout folder (with test/<class>/...)",
            file=sys.stderr,
        )
        return 2
    inputs = collect_inputs(args.paths)
    for argument in inputs.missing:
        print(f"defectflow: warning: {argument}: no such file, folder or match", file=sys.stderr)
    predictor, model = _load_predictor_for(args.model)
    out = args.out or resolve_path(os.environ["DEFECTFLOW_HOME"]) / "predictions" / time.strftime(
        "%Y%m%d-%H%M%S"
    )
    writer = ReportWriter(
        out / ("report.csv" if args.format == "csv" else "report.jsonl"),
        predictor.classes,
        args.format,
    )
    rows = []
    started = time.perf_counter()
    progress = tqdm(
        total=len(inputs.files), unit="img", desc="inspecting", file=sys.stderr, dynamic_ncols=True
    )
    try:
        for row in inspect_files(predictor, inputs.files, out, args.batch_size, args.overlay):
            writer.write(row)
            rows.append(row)
            progress.update()
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: {len(rows)} of {len(inputs.files)} files done, all in the report",
            file=sys.stderr,
        )
    finally:
        progress.close()
        writer.close()
    summary = summarize(rows, len(inputs.files), time.perf_counter() - started)
    _print_inspection(summary, model, writer.path)
    if args.score and not summary["interrupted"]:
        _score_inspection(args, predictor, rows, out)
    if summary["interrupted"]:
        return 130
    return 0 if summary["inspected"] else 1


def _print_inspection(summary: dict, model: str, report: Path) -> None:
    print(
        f"\n{model}: {summary['inspected']} of {summary['files']} files inspected in {summary['seconds']:.1f} s "
        f"({summary['images_per_second'] or 0:.1f} images/s)"
    )
    counts = [[label, count] for label, count in summary["classes"].items()]
    if counts:
        print(_table(["class", "images"], counts))
    if summary["inspected"]:
        print(
            f"defective: {summary['defective']} of {summary['inspected']} ({summary['defective_fraction']:.1%}); "
            f"uncertain: {summary['uncertain']}"
        )
    if summary["unreadable"]:
        print(f"not inspected: {len(summary['unreadable'])} files")
        for item in summary["unreadable"]:
            print(f"  {item['path']}: {item['error']}")
    print(f"report: {report}")


def _score_inspection(args, predictor, rows, out: Path) -> None:
    """--score: the inspected images of an MVTec-layout folder against its labels, with the
    same evaluation `defectflow evaluate` runs."""
    from defectflow.data.mvtec import labelled_samples
    from defectflow.evaluation.evaluate import evaluate

    samples = labelled_samples(Path(args.paths[0]), {Path(r.path).resolve() for r in rows if r.ok})
    unknown = sorted({s.label for s in samples} - set(predictor.classes))
    if unknown:
        print(f"\nnot scored: the folder has classes the model does not know: {', '.join(unknown)}")
        return
    if not samples:
        print("\nnot scored: no inspected image sits in the folder's MVTec layout")
        return
    result = evaluate(predictor, samples, args.batch_size)
    print(f"\nscored against the folder labels: {len(samples)} images")
    print(_table(["metric", "value"], [[k, f"{v:.4f}"] for k, v in result.headline().items()]))
    print(
        "\n"
        + _table(
            ["class", "precision", "recall", "F1", "support"],
            [
                [c, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", r["support"]]
                for c, r in result.metrics["per_class"].items()
            ],
        )
    )
    print(f"metrics: {result.save(out / 'score')}")


def _evaluate_stored_model(args, overrides: list[str]) -> int:
    """Never writes to the store: figures and the report go to --out."""
    from defectflow.evaluation.champion import assess_stored_model

    a = assess_stored_model(args.model, overrides, args.out)
    _print_evaluation(
        args,
        {"model": a.tag, "stage": a.stage, "data_root": a.data_root},
        a.result,
        a.champion and {"model": a.champion_tag, "metrics": a.champion.headline()},
        a.report,
        a.decision,
    )
    return 0


def _print_evaluation(
    args, about: dict, result, champion: dict | None, report: dict, decision=None
) -> None:
    headline = result.headline()
    if args.json:
        print(
            json.dumps(
                {
                    **about,
                    "n_images": result.metrics["n_images"],
                    "metrics": headline,
                    "per_class": result.metrics["per_class"],
                    "confusion_matrix": result.metrics["confusion_matrix"],
                    "champion": champion,
                    "gate": decision.to_dict() if decision else None,
                    "report": {k: str(v) for k, v in report.items()},
                },
                indent=2,
            )
        )
        return
    print(
        f"{about['model']} ({about['stage'] or 'run model'}) on {result.metrics['n_images']} test images "
        f"of {about['data_root']}"
    )
    rows = [
        [k, f"{v:.4f}"]
        + (
            [f"{champion['metrics'][k]:.4f}", f"{v - champion['metrics'][k]:+.4f}"]
            if champion
            else []
        )
        for k, v in headline.items()
    ]
    headers = ["metric", "value"] + (["production", "difference"] if champion else [])
    print(_table(headers, rows))
    print(
        "\n"
        + _table(
            ["class", "precision", "recall", "F1", "support"],
            [
                [c, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", r["support"]]
                for c, r in result.metrics["per_class"].items()
            ],
        )
    )
    m = result.metrics
    if "anomaly_threshold" in m:
        alone = m["classifier_only"]
        print(
            f"\nanomaly score > {m['anomaly_threshold']:.4f}: AUROC {m['anomaly_auroc']:.4f}, combined "
            f"{m['detection_auroc']:.4f}; {m['unknown_defect_answers']} unknown_defect answers; false alarms "
            f"{m['false_alarm_rate']:.3f} (classifier alone {alone['false_alarm_rate']:.3f}); classifier alone: "
            f"accuracy {alone['accuracy']:.4f}, defect Dice {alone['defect_dice']:.4f}"
        )
    if decision is not None:
        print(f"\nagainst production {champion['model']}: {decision.message}")
    print(f"\nreport: {report['html']}")


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_models(args) -> int:
    from defectflow import registry

    command = args.models_command
    if command == "list":
        rows = registry.list_models(args.name)
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print(f"no {args.name!r} models in the store")
        else:
            metrics = ("accuracy", "presence_accuracy", "defect_accuracy", "defect_dice", "auroc")
            print(
                _table(
                    [
                        "tag",
                        "stage",
                        "created",
                        "accuracy",
                        "presence",
                        "defect acc",
                        "defect Dice",
                        "AUROC",
                        "gate",
                    ],
                    [
                        [
                            r["tag"],
                            r["stage"],
                            r["creation_time"].replace("T", " ")[:19],
                            *(
                                f"{r['metrics'][m]:.3f}" if m in r["metrics"] else "-"
                                for m in metrics
                            ),
                            r["gate"][:60],
                        ]
                        for r in rows
                    ],
                )
            )
    elif command == "history":
        events = registry.history(args.name)
        if args.json:
            print(json.dumps(events, indent=2))
        else:
            print(
                _table(
                    ["time", "action", "tag", "previous", "user", "reason"],
                    [
                        [
                            e["time"],
                            e["action"],
                            e["tag"],
                            e["previous"] or "-",
                            e["user"],
                            e["reason"][:70],
                        ]
                        for e in events
                    ],
                )
                if events
                else f"no promotions of {args.name!r} yet"
            )
    elif command == "show":
        return _show_model(args)
    elif command == "promote":
        event = registry.promote(args.tag, reason=args.reason)
        print(f"{event['tag']} is production (previous: {event['previous'] or 'none'})")
    elif command == "rollback":
        event = registry.rollback(args.name, reason=args.reason)
        print(f"rolled back: {event['tag']} is production again; {event['previous']} archived")
    elif command == "archive":
        event = registry.archive(args.tag, reason=args.reason)
        print(f"{event['tag']} archived")
    return 0


def _show_model(args) -> int:
    from defectflow import registry

    tag = registry.resolve_tag(args.tag)
    metadata = registry.model_metadata(tag)
    path = registry.model_dir(tag)
    try:
        registry.verify_model(tag)
        integrity = "complete (every file matches its recorded SHA-256)"
    except registry.IncompleteModel as exc:
        integrity = f"DAMAGED: {exc}"
    about = {
        "tag": tag,
        "stage": registry.stage_of(tag),
        "path": str(path),
        "integrity": integrity,
        **{k: v for k, v in metadata.items() if k not in ("config", "evaluation", "files")},
        "files": {
            f: (path / f).stat().st_size for f in metadata.get("files", {}) if (path / f).exists()
        },
    }
    if args.json:
        print(json.dumps({**about, "config": metadata.get("config")}, indent=2, default=str))
        return 0
    gate = about.pop("gate", None) or {}
    metrics = about.pop("metrics", None) or {}
    files = about.pop("files")
    for key, value in about.items():
        print(
            f"{key + ':':<20} {value if not isinstance(value, (dict, list)) else json.dumps(value)}"
        )
    if metrics:
        print("\n" + _table(["metric", "value"], [[k, f"{v:.4f}"] for k, v in metrics.items()]))
    if gate:
        print(f"\ngate: {gate.get('message', '')}")
    print("\n" + _table(["file", "bytes"], [[f, n] for f, n in files.items()]))
    return 0


def cmd_reproduce(args) -> int:
    def start():
        from defectflow.orchestration.flows.reproduce import reproduce

        summary = reproduce(
            config=args.config,
            seeds=args.seeds,
            overrides=list(args.overrides),
            out_dir=str(args.out) if args.out else None,
        )
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
            print(
                f"defectflow: error: cannot serve on {args.host}:{args.port}: {exc.strerror} "
                "(another server running? pick another --port)",
                file=sys.stderr,
            )
            return 2
    target = args.bento
    if target is None:
        from defectflow.config import REPO_ROOT
        from defectflow.registry import DEFAULT_MODEL_NAME, bento_of, production_tag

        production = production_tag(DEFAULT_MODEL_NAME)
        if production is None:
            print(
                "defectflow: error: no production model to serve: train one or `defectflow models promote TAG`",
                file=sys.stderr,
            )
            return 2
        # service.py from source resolves the production model itself.
        target = bento_of(production, BENTO_NAME) or "service:DefectInspection"
        os.chdir(REPO_ROOT)
        print(f"serving the production model {production}")
    bentoml = Path(sys.executable).with_name("bentoml")
    command = [
        str(bentoml) if bentoml.exists() else "bentoml",
        "serve",
        target,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    print("$ " + " ".join(command), flush=True)
    os.execvpe(command[0], command, os.environ.copy())
    return 0  # pragma: no cover - exec does not return


def cmd_up(args) -> int:
    from defectflow.orchestration import stack

    home = Path(os.environ["DEFECTFLOW_HOME"])
    try:
        state = stack.up(home, args.host, args.port, worker=not args.no_worker)
        # Later commands of this project (same PREFECT_HOME) then run against this server.
        stack.use_server(state.api_url)
    except stack.StackError as exc:
        print(f"defectflow: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"\nPrefect UI: {state.ui_url}\nAPI: {state.api_url} (set in the project's Prefect profile)\n"
        f"deployments: training-pipeline, nightly-retrain (02:00 UTC), evaluate, promote, training-pipeline-gpu\n"
        "stop with `make down` (defectflow down)"
    )
    return 0


def cmd_down(args) -> int:
    from defectflow.orchestration import stack

    stack.down(Path(os.environ["DEFECTFLOW_HOME"]))
    stack.use_server(None)
    return 0


def cmd_status(args) -> int:
    from defectflow.orchestration import stack

    info = stack.status(Path(os.environ["DEFECTFLOW_HOME"]))
    if args.json:
        print(json.dumps(info, indent=2))
    elif not info["running"]:
        print("not running (start with `make up`)")
    else:
        print(f"UI {info['ui_url']} ({'healthy' if info['healthy'] else 'NOT answering'})")
        for name, p in info["processes"].items():
            print(
                f"{name}: pid {p['pid']} {'running' if p['running'] else 'NOT running'}, log {p['log']}"
            )
    return 0


def cmd_deploy(args) -> int:
    """Blocks, running flow runs that the Prefect server at PREFECT_API_URL schedules."""
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "defectflow: error: PREFECT_API_URL is not set: start a server (`prefect server start`) "
            "and export PREFECT_API_URL=http://127.0.0.1:4200/api",
            file=sys.stderr,
        )
        return 2
    from defectflow.orchestration.flows.training import training_pipeline

    training_pipeline.serve(
        name=args.name,
        cron=args.cron,
        tags=["defectflow"],
        description="Validate, tune, train, evaluate, gate and package a defect model.",
    )
    return 0


def cmd_review(args) -> int:
    """The review inbox in a terminal: the same `defectflow.serving.inbox.Inbox` the service writes."""
    import base64
    import getpass

    from defectflow.serving.inbox import INDEX_FILE, Inbox, InboxError

    inbox_path, incoming, limits = args.inbox, args.incoming, {}
    if inbox_path is None or incoming is None:
        from defectflow.config import load_config

        settings = load_config(args.config).serve.inbox
        inbox_path = inbox_path or Path(settings.path)
        incoming = incoming or Path(settings.incoming)
        limits = {"max_items": int(settings.max_items), "max_bytes": int(settings.max_bytes)}
    if not (inbox_path / INDEX_FILE).exists():
        print(
            f"defectflow: error: no inbox at {inbox_path} (the service creates it when serve.inbox.enabled=true)",
            file=sys.stderr,
        )
        return 2
    inbox = Inbox(inbox_path, incoming=incoming, **limits)
    command = args.review_command
    try:
        if command == "list":
            items = inbox.list(None if args.status == "all" else args.status)
            if args.json:
                print(json.dumps(items, indent=2))
            elif not items:
                print(f"no {args.status} items in {inbox_path}")
            else:
                print(
                    _table(
                        ["id", "time", "predicted", "confidence", "status", "model"],
                        [
                            [
                                i["id"],
                                i["time_iso"],
                                i["predicted_class"],
                                f"{i['confidence']:.3f}",
                                i["status"],
                                i["model"],
                            ]
                            for i in items
                        ],
                    )
                )
        elif command == "show":
            item = inbox.view(args.id) if args.out else inbox.get(args.id)
            images = {
                k: item.pop(k)
                for k in ("image_png_base64", "overlay_png_base64", "image_bytes")
                if k in item
            }
            if "prediction" in item:
                item["prediction"].pop("mask_png_base64", None)
            if args.out and images:
                args.out.mkdir(parents=True, exist_ok=True)
                for key, name in (
                    ("image_png_base64", f"{args.id}.png"),
                    ("overlay_png_base64", f"{args.id}_overlay.png"),
                ):
                    (args.out / name).write_bytes(base64.b64decode(images[key]))
                    print(f"wrote {args.out / name}", file=sys.stderr)
            print(json.dumps(item, indent=2))
        elif command == "accept":
            mask = args.mask
            if mask not in ("keep", "clear"):
                try:
                    mask = Path(mask).read_bytes()
                except OSError as exc:
                    print(
                        f"defectflow: error: --mask is keep, clear or a PNG file: {exc}",
                        file=sys.stderr,
                    )
                    return 2
            done = inbox.review(args.id, args.label, mask, args.reviewer or getpass.getuser())
            print(
                f"{done.id}: {done.label} -> {Path(done.incoming) / done.image}"
                + (f" (mask {Path(done.incoming) / done.mask})" if done.mask else "")
            )
        elif command == "discard":
            inbox.discard(args.id)
            print(f"{args.id}: discarded")
    except InboxError as exc:
        print(f"defectflow: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_environment()
    from defectflow.config import ConfigError
    from defectflow.data.mvtec import DatasetError
    from defectflow.registry import RegistryError

    handlers = {
        "validate": cmd_validate,
        "train": cmd_train,
        "reproduce": cmd_reproduce,
        "evaluate": cmd_evaluate,
        "models": cmd_models,
        "predict": cmd_predict,
        "serve": cmd_serve,
        "deploy": cmd_deploy,
        "up": cmd_up,
        "down": cmd_down,
        "status": cmd_status,
        "review": cmd_review,
    }
    if args.command == "data":
        handler = cmd_preview if args.data_command == "preview" else cmd_synth
    else:
        handler = handlers[args.command]
    try:
        return handler(args)
    except (ConfigError, DatasetError, FileExistsError, RegistryError) as exc:
        print(f"defectflow: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
