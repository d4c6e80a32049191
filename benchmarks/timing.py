"""Timing and result files shared by the benchmark scripts (run as `python benchmarks/<script>.py`,
which puts this folder on the import path).

Every script writes one JSON result file, by default `benchmarks/results/<name>.json` (committed
data: `benchmarks/doc_tables.py` renders docs/benchmarks.md from it on any machine):

    {"benchmark": name,
     "provenance": {"date", "finished", "command", "git_commit", "git_modified",
                    "machine": {"cores", "cpu_model", "ram_gb", "platform", "python"},
                    "load_avg_before": [1, 5, 15 min], "load_avg_after": [...]},
     "settings": the script's options,
     "goals": [{"figure", "measured", "goal", "met"}, ...]   the figures with a goal,
     "figures": {label: value, ...}                          the headline figures without one,
     ...the script's own detailed results}

`start` opens the record (provenance, load average before), `row` makes one figure, `finish`
splits the rows into goals and figures, adds the load average after and writes the file.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def take_turns(calls: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """ms per call of each named `calls[name]()`, after `warmup` calls of each, the names
    alternating order every repeat, so a load change on the shared machine affects them alike."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            start = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - start) * 1000)
    return times


# --- result files --------------------------------------------------------------------------------


def add_out_option(parser, name: str, command_line: bool) -> None:
    """`--out JSON`. From the command line (`main()` with argv None) it defaults to
    benchmarks/results/<name>.json; `main(argv)` called from Python (the tests) writes only
    where `--out` says, so a test never overwrites the committed results."""
    default = RESULTS_DIR / f"{name}.json" if command_line else None
    parser.add_argument(
        "--out",
        type=Path,
        default=default,
        help=f"JSON result file (default from the command line: benchmarks/results/{name}.json)",
    )


def load_avg() -> list[float]:
    """The 1-, 5- and 15-minute load averages."""
    return [round(v, 2) for v in os.getloadavg()]


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    ).stdout.rstrip("\n")  # not strip(): a status line starts with a space


def machine() -> dict:
    """Cores, CPU model and RAM of this machine."""
    cpu_model, ram_gb = platform.processor() or platform.machine(), None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = round(int(line.split()[1]) * 1024 / 1e9, 1)
                break
    except OSError:  # not Linux
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "ram_gb": ram_gb,
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
    }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def start(name: str, argv: list[str] | None, args=None) -> dict:
    """The result record of benchmark `name`: provenance (date, the command line, git commit and
    the tracked files modified in the working tree, machine, load average before) and `args`'
    options as settings. `argv`: the arguments main() was given (None: sys.argv)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    record: dict = {
        "benchmark": name,
        "provenance": {
            "date": _now(),
            "command": shlex.join(["python", f"benchmarks/{name}.py", *map(str, argv)]),
            "git_commit": git("log", "-1", "--format=%H %s"),
            "git_modified": git("status", "--porcelain", "--untracked-files=no").splitlines(),
            "machine": machine(),
            "load_avg_before": load_avg(),
        },
    }
    if args is not None:
        record["settings"] = {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
        }
    return record


def row(figure: str, measured, goal: str | None = None, met: bool | None = None) -> dict:
    """One figure: with a goal (e.g. "<= 25") and whether it was met, or reported only."""
    return {"figure": figure, "measured": measured, "goal": goal, "met": met}


def finish(record: dict, rows: list[dict], out: Path | None) -> dict:
    """Rows with a goal into record["goals"], the others into record["figures"]; the load average
    after; written to `out` (when given) and returned."""
    record["goals"] = [r for r in rows if r["goal"] is not None]
    record["figures"] = {r["figure"]: r["measured"] for r in rows if r["goal"] is None}
    record["provenance"]["finished"] = _now()
    record["provenance"]["load_avg_after"] = load_avg()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"results written to {out}", flush=True)
    return record
