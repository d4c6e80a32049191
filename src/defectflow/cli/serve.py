"""`defectflow serve`: a Bento over HTTP; `defectflow review`: the inbox the service fills."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

from defectflow.cli.common import BENTO_NAME, table


def add_commands(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="serve a built Bento over HTTP")
    serve.add_argument(
        "--bento",
        default=None,
        help="Bento tag (default: the Bento of the production model, else service.py from source)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=3000)
    serve.set_defaults(handler=cmd_serve)
    review = sub.add_parser(
        "review",
        help="review the inbox of uncertain predictions: vote on their labels (written into "
        "the incoming dataset once serve.inbox.min_reviews reviewers agree), or discard them",
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
    review_list.set_defaults(handler=cmd_review_list)
    review_show = review_sub.add_parser(
        "show", help="one item: its prediction; --out writes image and overlay PNGs"
    )
    review_show.add_argument("id")
    review_show.add_argument(
        "--out", type=Path, default=None, help="folder for <id>.png and <id>_overlay.png"
    )
    review_show.add_argument("--json", action="store_true")
    review_show.set_defaults(handler=cmd_review_show)
    review_accept = review_sub.add_parser(
        "accept",
        help="vote that an item is --label; written into the incoming dataset once the votes "
        "meet the review policy (serve.inbox.min_reviews, trusted_reviewers of --config)",
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
        "--reviewer",
        default=None,
        help="who reviewed (default: the login name); recorded as given (identity `local`)",
    )
    review_accept.set_defaults(handler=cmd_review_accept)
    review_discard = review_sub.add_parser("discard", help="drop an item")
    review_discard.add_argument("id")
    review_discard.set_defaults(handler=cmd_review_discard)


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


def _with_inbox(command):
    """The review inbox in a terminal: the same `defectflow.serving.inbox.Inbox` the service
    writes. The handler opens the inbox of --inbox and --incoming (default: serve.inbox of
    --config) under the review policy of --config, then runs command(args, inbox, inbox_path);
    an InboxError exits 1."""

    @functools.wraps(command)
    def handler(args) -> int:
        from defectflow.config import load_config
        from defectflow.serving.inbox import INDEX_FILE, Inbox, InboxError, ReviewPolicy

        settings = load_config(args.config).serve.inbox
        inbox_path = args.inbox or Path(settings.path)
        incoming = args.incoming or Path(settings.incoming)
        limits = {
            "max_items": int(settings.max_items),
            "max_bytes": int(settings.max_bytes),
            "policy": ReviewPolicy.from_config(settings),
        }
        if not (inbox_path / INDEX_FILE).exists():
            print(
                f"defectflow: error: no inbox at {inbox_path} (the service creates it when serve.inbox.enabled=true)",
                file=sys.stderr,
            )
            return 2
        inbox = Inbox(inbox_path, incoming=incoming, **limits)
        try:
            return command(args, inbox, inbox_path)
        except InboxError as exc:
            print(f"defectflow: error: {exc}", file=sys.stderr)
            return 1

    return handler


@_with_inbox
def cmd_review_list(args, inbox, inbox_path: Path) -> int:
    items = inbox.list(None if args.status == "all" else args.status)
    if args.json:
        print(json.dumps(items, indent=2))
    elif not items:
        print(f"no {args.status} items in {inbox_path}")
    else:
        print(
            table(
                ["id", "time", "predicted", "confidence", "status", "votes", "model"],
                [
                    [
                        i["id"],
                        i["time_iso"],
                        i["predicted_class"],
                        f"{i['confidence']:.3f}",
                        i["status"],
                        _votes(i["votes"], i["disputed"]),
                        i["model"],
                    ]
                    for i in items
                ],
            )
        )
        print(f"review policy: {inbox.policy.describe()}")
    return 0


def _votes(votes: list[dict], disputed: bool) -> str:
    """The votes as `ann:crack bob:poke (disputed)`, or `-` without any."""
    text = " ".join(f"{v['reviewer']}:{v['label']}" for v in votes) or "-"
    return text + (" (disputed)" if disputed else "")


@_with_inbox
def cmd_review_show(args, inbox, inbox_path: Path) -> int:
    import base64

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
    return 0


@_with_inbox
def cmd_review_accept(args, inbox, inbox_path: Path) -> int:
    import getpass

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
    from defectflow.serving.inbox import Reviewer

    done = inbox.review(
        args.id, args.label, mask, Reviewer(args.reviewer or getpass.getuser(), "local")
    )
    if done.status == "pending":
        print(
            f"{done.id}: vote recorded ({done.reviewer}: {done.label}); still pending with "
            f"{_votes(list(done.votes), done.disputed)}: {inbox.policy.describe()}"
        )
        return 0
    print(
        f"{done.id}: {done.label} -> {Path(done.incoming) / done.image}"
        + (f" (mask {Path(done.incoming) / done.mask})" if done.mask else "")
    )
    return 0


@_with_inbox
def cmd_review_discard(args, inbox, inbox_path: Path) -> int:
    inbox.discard(args.id)
    print(f"{args.id}: discarded")
    return 0
