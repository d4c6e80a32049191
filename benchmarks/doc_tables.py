"""Turn benchmark results (JSON) into the tables of the docs.

    .venv/bin/python benchmarks/doc_tables.py [--results DIR] [--docs FILE.md ...]

The docs are README.md and every docs/*.md (sorted) unless --docs names others; the container
table lives in docs/benchmarks.md. A doc marks where a benchmark's table goes with a pair of
comments naming the benchmark:

    <!-- benchmark: container_bench -->
    ...the table, rewritten by this command...
    <!-- /benchmark: container_bench -->

Each such block is replaced by a Markdown table of the `goals` rows of
`DIR/container_bench.json` (DIR: `$DEFECTFLOW_HOME/benchmarks`, where the benchmark scripts
write; rows {figure, measured, goal, met}), followed by a line saying when, on which commit
(the JSON's date) and on how loaded a machine it was measured. A block whose JSON is missing is left as it is,
and said so; the command fails when a doc names a benchmark twice or leaves a block open.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(
    r"(<!-- benchmark: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /benchmark: (?P=name) -->)", re.S
)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("|", "\\|")


def render(results: dict, source: Path) -> str:
    """The Markdown table of one benchmark's results."""
    lines = ["| figure | measured | goal | |", "|---|---|---|---|"]
    for row in results["goals"]:
        verdict = {True: "met", False: "**missed**", None: ""}[row.get("met")]
        lines.append(
            f"| {_cell(row['figure'])} | {_cell(row['measured'])} | {_cell(row.get('goal'))} | {verdict} |"
        )
    machine = results.get("machine", {})
    when = time.strftime("%Y-%m-%d", time.gmtime(source.stat().st_mtime))
    load = [machine.get(k) for k in ("load_avg_1m_start", "load_avg_1m_end")]
    note = [f"`benchmarks/{source.stem}.py`"]
    if results.get("git_head"):
        note.append(f"commit {str(results['git_head']).split()[0][:10]}")
    note.append(when)
    if machine.get("cpus"):
        note.append(f"{machine['cpus']} CPU cores")
    if all(v is not None for v in load):
        note.append(f"1-min load average {load[0]} at the start, {load[1]} at the end")
    return "\n".join(lines) + "\n\nMeasured by " + "; ".join(note) + ".\n"


def rewrite(doc: Path, results_dir: Path) -> list[str]:
    """Rewrite the benchmark blocks of `doc`; returns what was done, one line each."""
    text = doc.read_text()
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
        source = results_dir / f"{match.group('name')}.json"
        if not source.is_file():
            done.append(f"{doc.name}: {match.group('name')}: no {source}, left as it was")
            return match.group(0)
        table = render(json.loads(source.read_text()), source)
        done.append(f"{doc.name}: {match.group('name')}: table from {source}")
        return match.group(1) + table + match.group(4)

    rewritten = BLOCK.sub(replace, text)
    if rewritten != text:  # a doc without a changed table keeps its file (and its time stamp)
        doc.write_text(rewritten)
    return done


def default_docs() -> list[Path]:
    """README.md, then every page of docs/ in name order."""
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    home = Path(os.environ.get("DEFECTFLOW_HOME", REPO_ROOT / ".defectflow"))
    parser.add_argument(
        "--results", type=Path, default=home / "benchmarks", help="folder of the benchmarks' JSON"
    )
    parser.add_argument(
        "--docs",
        type=Path,
        nargs="+",
        default=default_docs(),
        help="Markdown files to rewrite (default: README.md and docs/*.md)",
    )
    args = parser.parse_args(argv)
    for doc in args.docs:
        for line in rewrite(doc, args.results):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
