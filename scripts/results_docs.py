"""docs/results/: model-quality pages generated from the JSON of real runs, never typed.

    python scripts/results_docs.py add NAME RUN_OR_RESULTS_DIR [--category C] [--command "..."]
        record a finished training run folder (its evaluation/metrics.json) or a
        `defectflow reproduce` results folder (results.json) as docs/results/NAME.json,
        with the machine, date and commit it was measured on and the category it measured
        (default: NAME when docs/results/anchors.yaml knows it)
    python scripts/results_docs.py            render docs/results/NAME.md for every NAME.json
    python scripts/results_docs.py --check    exit 1 when a page is not current (make test)

The tables come from `defectflow.evaluation.results` (the same code that prints them at the
end of a reproduce run), so a page shows exactly what the run measured. A category named in
docs/results/anchors.yaml gets its published figures and targets beside the measured ones;
such a category without a recorded run still gets a page, saying it was not measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
#: Published figures and targets per category, kept as data beside the pages.
ANCHORS = RESULTS / "anchors.yaml"


def load_anchors(path: Path | None = None) -> dict:
    """anchors.yaml: {"sources": {key: {label, about}}, "categories": {category: {source: {metric: value}}}}."""
    import yaml

    return yaml.safe_load((path or ANCHORS).read_text())


def _commit(source: Path) -> str:
    """The code revision the run's model was registered with (the registry records it), else
    that of the checkout now, marked so. `source`: a run folder, or a reproduce results folder
    (then its first run's folder answers)."""
    package = source / "package.json"
    if not package.is_file() and (source / "results.json").is_file():
        runs = json.loads((source / "results.json").read_text())["runs"]
        package = Path(runs[0]["run_dir"]) / "package.json" if runs else package
    if package.is_file():
        from defectflow.environment import configure_environment
        from defectflow.registry import model_metadata

        configure_environment()
        try:
            return model_metadata(json.loads(package.read_text())["model_tag"])["code_revision"][
                :12
            ]
        except Exception as error:  # the model may be gone from this machine's store
            print(f"no registered model for {source.name} ({error}); using the checkout's commit")
    out = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return f"{out.stdout.strip() or 'unknown'} (checkout when recorded)"


def _machine() -> str:
    """The machine, with its CPU model: TensorFlow's determinism holds on the same hardware only,
    so the same seed gives other weights on another CPU."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from timing import machine

    about = machine()
    return f"{about['platform']}, {about['cores']} CPU cores ({about['cpu_model']}), Python {about['python']}"


def record(source: Path, command: str, category: str | None = None) -> dict:
    """The results of a run folder or a reproduce results folder, with their provenance and
    the category they measured (None: not one of anchors.yaml's, or not said)."""
    from omegaconf import OmegaConf

    from defectflow.evaluation import results

    if (source / "results.json").is_file():
        data = json.loads((source / "results.json").read_text())
        runs, kind = data["runs"], "reproduce"
    elif (source / "evaluation" / "metrics.json").is_file():
        metrics = json.loads((source / "evaluation" / "metrics.json").read_text())
        cfg = OmegaConf.load(source / "config.yaml")
        runs = [
            {
                "seed": int(cfg.data.split.seed),
                "metrics": metrics,
                "classes": metrics["classes"],
                "confusion_matrix": metrics["confusion_matrix"],
                "run_dir": source.name,
                "config": str(cfg.get("name", "")),
            }
        ]
        kind = "run"
    else:
        raise SystemExit(f"{source}: neither results.json nor evaluation/metrics.json is there")
    stamp = datetime.datetime.fromtimestamp(source.stat().st_mtime, datetime.UTC)
    return {
        "kind": kind,
        "source": source.name,
        "measured": stamp.strftime("%Y-%m-%d"),
        "machine": _machine(),
        "commit": _commit(source),
        "command": command,
        "category": category,
        "runs": runs,
        "summary": results.summarize(runs),
    }


def _header(title: str, source: str) -> list[str]:
    return [
        f"# {title}",
        "",
        "[← Results](../results.md) · [README](../../README.md)",
        "",
        f"Generated by `python scripts/results_docs.py` from {source}; do not edit by hand.",
        "",
    ]


def anchor_table(category: str, anchors: dict, runs: list[dict] | None) -> str:
    """The published figures and targets of `category` beside defectflow's mean ± std over
    `runs` (None: not measured yet), one row per metric any of them has."""
    from defectflow.evaluation import results

    figures = anchors["categories"][category]
    sources = [key for key in anchors["sources"] if key in figures]
    summary = results.summarize(runs) if runs else {}
    keys = [k for k in results.LABELS if any(k in figures[s] for s in sources)]
    measured = f"defectflow, mean ± std (n={len(runs)})" if runs else "defectflow"
    lines = [
        "| metric | "
        + " | ".join(anchors["sources"][s]["label"] for s in sources)
        + f" | {measured} | target reached |",
        "|---|" + "---|" * (len(sources) + 2),
    ]
    for key in keys:
        cells = [
            ("≥ " if s == "target" else "") + f"{figures[s][key]:.3f}" if key in figures[s] else "—"
            for s in sources
        ]
        if key in summary:
            row = summary[key]
            ours = f"**{results.mean_std(row)}**"
            target = figures.get("target", {}).get(key)
            reached = "—" if target is None else ("yes" if row["mean"] >= target else "no")
        else:
            ours, reached = ("not measured", "—") if not runs else ("not recorded", "—")
        lines.append(f"| {results.LABELS[key]} | " + " | ".join(cells) + f" | {ours} | {reached} |")
    lines.append("")
    if "coverage" in summary and "accepted_accuracy" in summary:
        accepted = summary["accepted_accuracy"]
        lines += [
            f"Accuracy of the accepted answers on test: {results.mean_std(accepted)}; the "
            "confidence threshold was chosen for "
            + " / ".join(f"{t:.2f}" for t in results.accept_targets(runs))
            + " on validation.",
            "",
        ]
    lines += [
        f"- {anchors['sources'][s]['label']}: {anchors['sources'][s]['about']}" for s in sources
    ]
    return "\n".join(lines)


def render(name: str, data: dict, anchors: dict | None = None) -> str:
    from defectflow.evaluation import results

    anchors = anchors if anchors is not None else load_anchors()
    runs = data["runs"]
    summary = results.summarize(runs)  # from the runs, so a page shows every figure they have
    lines = [
        *_header(f"Results: {name}", f"[`{name}.json`]({name}.json)"),
        "| measured | machine | commit | command | from |",
        "|---|---|---|---|---|",
        f"| {data['measured']} | {data['machine']} | `{data['commit']}` | `{data['command']}` "
        f"| {data['kind']} `{data['source']}` |",
        "",
    ]
    category = data.get("category")
    if category in anchors["categories"]:
        lines += [
            "## Beside the published figures and the targets",
            "",
            anchor_table(category, anchors, runs),
            "",
        ]
    lines += ["## Test-split figures", "", results.markdown(runs, summary), ""]
    stages = results.stage_markdown(runs)
    if stages is not None:
        lines += ["## Wall time of each stage, seconds", "", stages, ""]
    pooled = results.pooled_confusion(runs)
    if pooled is not None:
        title = "Confusion matrix" + (", the runs added up" if len(runs) > 1 else "")
        lines += [f"## {title} (rows: true class)", "", results.confusion_markdown(*pooled), ""]
    return "\n".join(lines)


def render_unmeasured(category: str, anchors: dict) -> str:
    """The page of a category anchors.yaml names but no recorded run measured yet."""
    return "\n".join(
        [
            *_header(f"Results: {category}", "[`anchors.yaml`](anchors.yaml)"),
            f"Not measured yet: `make reproduce CATEGORY={category}` runs the default recipe on "
            "3 split seeds and records the figures here.",
            "",
            "## The published figures and the targets",
            "",
            anchor_table(category, anchors, None),
            "",
        ]
    )


def pages(anchors: dict) -> dict[Path, str]:
    """Every page and its text: one per recorded NAME.json, one per category of anchors.yaml
    that has none."""
    out = {
        source.with_suffix(".md"): render(source.stem, json.loads(source.read_text()), anchors)
        for source in sorted(RESULTS.glob("*.json"))
    }
    for category in anchors["categories"]:
        page = RESULTS / f"{category}.md"
        out.setdefault(page, render_unmeasured(category, anchors))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail when a page is not current")
    sub = parser.add_subparsers(dest="action")
    add = sub.add_parser("add", help="record a run's results as docs/results/NAME.json")
    add.add_argument("name")
    add.add_argument("source", type=Path)
    add.add_argument("--command", default="", help="the command that made the run")
    add.add_argument(
        "--category",
        default=None,
        help="the category it measured, for its published figures (default: NAME if anchors.yaml has it)",
    )
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    anchors = load_anchors()
    if args.action == "add":
        category = args.category or (args.name if args.name in anchors["categories"] else None)
        data = record(args.source.resolve(), args.command, category)
        (RESULTS / f"{args.name}.json").write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {(RESULTS / f'{args.name}.json').relative_to(REPO)}")
    stale = []
    for page, text in pages(anchors).items():
        if page.is_file() and page.read_text() == text:
            continue
        if args.check:
            stale.append(page.relative_to(REPO).as_posix())
        else:
            page.write_text(text)
            print(f"wrote {page.relative_to(REPO)}")
    if stale:
        print(
            f"not current: {', '.join(stale)}; run python scripts/results_docs.py", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
