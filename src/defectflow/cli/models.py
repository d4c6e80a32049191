"""`defectflow models`: the model registry: list, history, show, promote, rollback, archive."""

from __future__ import annotations

import argparse
import json

from defectflow.cli.common import table


def add_commands(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="the model registry: stages, promotion, rollback")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    for name, text, handler in (
        ("list", "models with stage and metrics, newest first", cmd_list),
        ("history", "promotions, rollbacks and archivals, oldest first", cmd_history),
    ):
        p = models_sub.add_parser(name, help=text)
        p.add_argument("--name", default="defectflow", help="model name (default: defectflow)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(handler=handler)
    show = models_sub.add_parser("show", help="everything recorded about a model")
    show.add_argument("tag")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_show)
    promote = models_sub.add_parser("promote", help="make a model the production model")
    promote.add_argument("tag")
    promote.add_argument("--reason", default="promoted by hand")
    promote.set_defaults(handler=cmd_promote)
    rollback = models_sub.add_parser("rollback", help="restore the previous production model")
    rollback.add_argument("--name", default="defectflow")
    rollback.add_argument("--reason", default="rolled back by hand")
    rollback.set_defaults(handler=cmd_rollback)
    archive = models_sub.add_parser("archive", help="mark a model archived")
    archive.add_argument("tag")
    archive.add_argument("--reason", default="archived by hand")
    archive.set_defaults(handler=cmd_archive)


def cmd_list(args) -> int:
    from defectflow import registry

    rows = registry.list_models(args.name)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no {args.name!r} models in the store")
    else:
        from defectflow.artifacts import LISTED_METRICS as metrics

        print(
            table(
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
                        *(f"{r['metrics'][m]:.3f}" if m in r["metrics"] else "-" for m in metrics),
                        r["gate"][:60],
                    ]
                    for r in rows
                ],
            )
        )
    return 0


def cmd_history(args) -> int:
    from defectflow import registry

    events = registry.history(args.name)
    if args.json:
        print(json.dumps(events, indent=2))
    else:
        print(
            table(
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
    return 0


def cmd_show(args) -> int:
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
        print("\n" + table(["metric", "value"], [[k, f"{v:.4f}"] for k, v in metrics.items()]))
    if gate:
        print(f"\ngate: {gate.get('message', '')}")
    print("\n" + table(["file", "bytes"], [[f, n] for f, n in files.items()]))
    return 0


def cmd_promote(args) -> int:
    from defectflow import registry

    event = registry.promote(args.tag, reason=args.reason)
    print(f"{event['tag']} is production (previous: {event['previous'] or 'none'})")
    return 0


def cmd_rollback(args) -> int:
    from defectflow import registry

    event = registry.rollback(args.name, reason=args.reason)
    print(f"rolled back: {event['tag']} is production again; {event['previous']} archived")
    return 0


def cmd_archive(args) -> int:
    from defectflow import registry

    event = registry.archive(args.tag, reason=args.reason)
    print(f"{event['tag']} archived")
    return 0
