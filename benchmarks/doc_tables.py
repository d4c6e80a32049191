"""Turn the benchmarks' result files into the tables of the docs: no figure typed by hand.

    python benchmarks/doc_tables.py [--check] [--results DIR] [--docs FILE.md ...]

Every benchmark script writes one JSON result file, `benchmarks/results/NAME.json` (committed
data; its layout: benchmarks/timing.py). A doc marks where the table of benchmark NAME goes with
a pair of comments:

    <!-- benchmark: NAME -->
    ...rewritten by this command...
    <!-- /benchmark: NAME -->

With `DIR/NAME.json` present (DIR: benchmarks/results), the block becomes a table of its `goals`
rows (figure, measured, goal, met or missed), a table of its other `figures`, and a line saying
how, when, on which commit and on which machine, how loaded, it was measured. Without it, the
block says so: its first line is "Not measured since the JSON was kept; run `python
benchmarks/NAME.py`." and whatever follows that line in the doc (why it was not run) is kept.

The docs are README.md and every docs/*.md (sorted) unless --docs names others. The command
fails when a doc names a benchmark twice or leaves a block open, and when a result file has no
block in any doc. `--check` rewrites nothing and fails when a block is not what the results
make of it (tests/test_doc_tables.py runs it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
BLOCK = re.compile(
    r"(<!-- benchmark: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /benchmark: (?P=name) -->)", re.S
)
NOT_MEASURED = "Not measured since the JSON was kept; run `python benchmarks/{name}.py`."


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("|", "\\|").strip()


def provenance_line(results: dict) -> str:
    """How, when, on which commit and machine, under which load the results were measured."""
    p = results["provenance"]
    machine = p["machine"]
    date = p["date"].replace("T", " ")[:16] + " UTC"
    commit = p["git_commit"].split()[0][:10] if p.get("git_commit") else "unknown commit"
    modified = len(p.get("git_modified") or [])
    if modified:
        commit += f" ({modified} tracked file{'s' if modified > 1 else ''} modified)"
    ram = f", {machine['ram_gb']:g} GB RAM" if machine.get("ram_gb") else ""
    before, after = p["load_avg_before"][0], p["load_avg_after"][0]
    line = (
        f"Measured by `{p['command']}` on {date}, commit {commit}; {machine['cores']} cores "
        f"({machine['cpu_model']}){ram}; 1-min load average {before:g} before, {after:g} after."
    )
    if results.get("busy"):
        line += f" Busy machine: {results['busy']}."
    return line


def render(results: dict) -> str:
    """The Markdown of one benchmark's results: goals, other figures, provenance."""
    parts = []
    if results.get("goals"):
        lines = ["| figure | measured | goal | |", "|---|---|---|---|"]
        for row in results["goals"]:
            verdict = {True: "met", False: "**missed**", None: ""}[row.get("met")]
            lines.append(
                f"| {_cell(row['figure'])} | {_cell(row['measured'])} | {_cell(row['goal'])} "
                f"| {verdict} |"
            )
        parts.append("\n".join(lines))
    if results.get("figures"):
        lines = ["| figure | measured |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in results["figures"].items()]
        parts.append("\n".join(lines))
    parts.append(provenance_line(results))
    return "\n\n".join(parts) + "\n"


def _load(source: Path) -> dict:
    results = json.loads(source.read_text())
    missing = [key for key in ("provenance", "goals", "figures") if key not in results]
    if missing:
        raise SystemExit(
            f"{source}: no {', '.join(missing)}: not a result file of benchmarks/timing.py"
        )
    return results


def rewritten(doc: Path, text: str, results_dir: Path) -> tuple[str, list[str]]:
    """`text` of `doc` with its benchmark blocks rendered; what was done, one line each."""
    names = [m.group("name") for m in BLOCK.finditer(text)]
    if len(names) != len(set(names)):
        raise SystemExit(
            f"{doc}: a benchmark block appears twice: {sorted(n for n in names if names.count(n) > 1)}"
        )
    if text.count("<!-- benchmark: ") != len(names):
        raise SystemExit(
            f"{doc}: a '<!-- benchmark: NAME -->' has no matching '<!-- /benchmark: NAME -->'"
        )
    done = []

    def replace(match: re.Match) -> str:
        name = match.group("name")
        source = results_dir / f"{name}.json"
        if source.is_file():
            body = render(_load(source))
            done.append(f"{doc.name}: {name}: table from {source}")
        else:
            first = NOT_MEASURED.format(name=name)
            body = match.group("body")
            if body.split("\n", 1)[0] != first:
                body = first + "\n"
            done.append(f"{doc.name}: {name}: no {source}: not measured")
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(replace, text), done


def rewrite(doc: Path, results_dir: Path = RESULTS_DIR) -> list[str]:
    """Rewrite the benchmark blocks of `doc`; returns what was done, one line each."""
    text = doc.read_text()
    new, done = rewritten(doc, text, results_dir)
    if new != text:  # a doc without a changed table keeps its file (and its time stamp)
        doc.write_text(new)
    return done


def stale(doc: Path, results_dir: Path = RESULTS_DIR) -> list[str]:
    """The blocks of `doc` that differ from what the results make of them."""
    text = doc.read_text()
    new, _ = rewritten(doc, text, results_dir)
    old_blocks = {m.group("name"): m.group(0) for m in BLOCK.finditer(text)}
    return [
        f"{doc.name}: {m.group('name')}"
        for m in BLOCK.finditer(new)
        if old_blocks.get(m.group("name")) != m.group(0)
    ]


def blocks(docs: list[Path]) -> list[str]:
    """The benchmark names the docs have a block for."""
    return [m.group("name") for doc in docs for m in BLOCK.finditer(doc.read_text())]


def unplaced(docs: list[Path], results_dir: Path = RESULTS_DIR) -> list[str]:
    """Result files no doc has a block for."""
    placed = set(blocks(docs))
    return sorted(p.name for p in results_dir.glob("*.json") if p.stem not in placed)


def default_docs() -> list[Path]:
    """README.md, then every page of docs/ in name order."""
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS_DIR,
        help="folder of the benchmarks' JSON (default: benchmarks/results)",
    )
    parser.add_argument(
        "--docs",
        type=Path,
        nargs="+",
        default=default_docs(),
        help="Markdown files to rewrite (default: README.md and docs/*.md)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="rewrite nothing; exit 1 when a block is not current",
    )
    args = parser.parse_args(argv)
    problems = [
        f"{name}: no '<!-- benchmark: {Path(name).stem} -->' block in the docs"
        for name in unplaced(args.docs, args.results)
    ]
    if args.check:
        problems += [
            f"{block} is stale: run `python benchmarks/doc_tables.py`"
            for doc in args.docs
            for block in stale(doc, args.results)
        ]
    else:
        for doc in args.docs:
            for line in rewrite(doc, args.results):
                print(line)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
