"""benchmarks/doc_tables.py: the benchmarks' JSON result files into the docs' tables, between
markers; the docs' tables current with benchmarks/results/."""

import json

import pytest
from helpers_processes import REPO_ROOT, load_file_module


def _module(name: str):
    return load_file_module("benchmarks", name)


doc_tables = _module("doc_tables")
timing = _module("timing")

BENCHMARKS_DOC = REPO_ROOT / "docs" / "benchmarks.md"
#: benchmarks/*.py that are not benchmarks: helpers and the baseline app serve_bench starts.
NOT_BENCHMARKS = {"doc_tables", "timing", "baseline_convnext_app"}

RESULTS = {
    "benchmark": "bench",
    "provenance": {
        "date": "2026-12-06T03:07:11+00:00",
        "command": "python benchmarks/bench.py --repeats 30",
        "git_commit": "abc1234567890 a subject",
        "git_modified": [" M src/x.py"],
        "machine": {"cores": 2, "cpu_model": "Some CPU", "ram_gb": 25.3},
        "load_avg_before": [0.3, 0.5, 0.6],
        "load_avg_after": [1.2, 0.7, 0.6],
    },
    "goals": [
        {"figure": "ratio", "measured": 1.556, "goal": "<= 1.15", "met": False},
        {"figure": "images/s", "measured": 83.2, "goal": ">= 60", "met": True},
    ],
    "figures": {"p50 (ms)": 18.25, "a | b": "x"},
}


def _doc(tmp_path, *names: str, body: str = "old table\n"):
    doc = tmp_path / "DOC.md"
    doc.write_text(
        "before\n"
        + "".join(f"<!-- benchmark: {n} -->\n{body}<!-- /benchmark: {n} -->\n" for n in names)
        + "after\n"
    )
    return doc


def test_a_block_is_replaced_by_its_tables_and_the_provenance(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps(RESULTS))
    doc = _doc(tmp_path, "bench")
    done = doc_tables.rewrite(doc, tmp_path)
    text = doc.read_text()
    assert text.startswith("before\n<!-- benchmark: bench -->\n| figure | measured | goal | |")
    assert "| ratio | 1.556 | <= 1.15 | **missed** |" in text
    assert "| images/s | 83.2 | >= 60 | met |" in text
    assert "| figure | measured |\n|---|---|\n| p50 (ms) | 18.25 |\n| a \\| b | x |" in text
    assert (
        "Measured by `python benchmarks/bench.py --repeats 30` on 2026-12-06 03:07 UTC, commit "
        "abc1234567 (1 tracked file modified); 2 cores (Some CPU), 25.3 GB RAM; 1-min load "
        "average 0.3 before, 1.2 after.\n<!-- /benchmark: bench -->\nafter\n"
    ) in text
    assert "old table" not in text and done == [f"DOC.md: bench: table from {tmp_path}/bench.json"]
    doc_tables.rewrite(doc, tmp_path)
    assert doc.read_text() == text  # idempotent


def test_a_block_without_its_json_says_it_was_not_measured_and_keeps_why(tmp_path):
    doc = _doc(tmp_path, "gone", body="| figure | measured |\n| p50 | 17.7 |\n")
    doc_tables.rewrite(doc, tmp_path)
    sentence = "Not measured since the JSON was kept; run `python benchmarks/gone.py`.\n"
    assert "17.7" not in doc.read_text() and f"-->\n{sentence}<!--" in doc.read_text()
    # A reason written after the sentence stays.
    doc = _doc(tmp_path, "gone", body=sentence + "It needs the capsule model.\n")
    text = doc.read_text()
    doc_tables.rewrite(doc, tmp_path)
    assert doc.read_text() == text


def test_check_fails_on_a_stale_block_and_on_a_json_without_block(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "bench.json").write_text(json.dumps(RESULTS))
    doc = _doc(tmp_path, "bench")
    argv = ["--results", str(results), "--docs", str(doc)]
    assert doc_tables.main([*argv, "--check"]) == 1
    assert "DOC.md: bench is stale" in capsys.readouterr().err
    assert "old table" in doc.read_text()  # --check writes nothing
    assert doc_tables.main(argv) == 0 and doc_tables.main([*argv, "--check"]) == 0
    (results / "other.json").write_text(json.dumps(RESULTS))
    assert doc_tables.main([*argv, "--check"]) == 1
    assert "other.json: no '<!-- benchmark: other -->' block" in capsys.readouterr().err


@pytest.mark.parametrize(
    "broken", ["<!-- benchmark: a -->\nx\n", "<!-- benchmark: a -->\n<!-- /benchmark: a -->\n" * 2]
)
def test_an_open_or_repeated_block_is_refused(tmp_path, broken):
    doc = tmp_path / "DOC.md"
    doc.write_text(broken)
    with pytest.raises(SystemExit):
        doc_tables.rewrite(doc, tmp_path)


def test_a_json_without_provenance_is_refused(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps({"goals": []}))
    with pytest.raises(SystemExit, match="provenance"):
        doc_tables.rewrite(_doc(tmp_path, "bench"), tmp_path)


def test_what_timing_records_renders(tmp_path):
    """A record made by the scripts' helper (start, row, finish) is what doc_tables reads."""
    parser = __import__("argparse").ArgumentParser()
    timing.add_out_option(parser, "bench", command_line=False)
    args = parser.parse_args(["--out", str(tmp_path / "bench.json")])
    record = timing.start("bench", ["--out", "x.json"], args)
    rows = [timing.row("p50 (ms)", 12.5), timing.row("ratio", 0.8, "<= 1.3", True)]
    timing.finish(record, rows, args.out)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["goals"] == [rows[1]] and saved["figures"] == {"p50 (ms)": 12.5}
    assert saved["provenance"]["command"] == "python benchmarks/bench.py --out x.json"
    assert saved["provenance"]["machine"]["cores"] >= 1
    assert "| ratio | 0.8 | <= 1.3 | met |" in doc_tables.render(saved)
    # Called from Python without --out, a script writes nothing (no committed result overwritten).
    assert parser.parse_args([]).out is None


def test_the_benchmark_docs_are_current_with_the_results():
    """Every JSON of benchmarks/results/ is rendered, as it is now, into its block."""
    assert doc_tables.main(["--check"]) == 0


def test_every_benchmark_has_a_block_with_its_json_or_saying_it_was_not_measured():
    scripts = {
        p.stem for p in (REPO_ROOT / "benchmarks").glob("*.py") if p.stem not in NOT_BENCHMARKS
    }
    bodies = {
        m.group("name"): m.group("body")
        for m in doc_tables.BLOCK.finditer(BENCHMARKS_DOC.read_text())
    }
    assert scripts <= set(bodies), f"benchmarks without a block: {sorted(scripts - set(bodies))}"
    for page in doc_tables.default_docs():
        for match in doc_tables.BLOCK.finditer(page.read_text()):
            name = match.group("name")
            if not (doc_tables.RESULTS_DIR / f"{name}.json").is_file():
                assert match.group("body").startswith(doc_tables.NOT_MEASURED.format(name=name)), (
                    f"{page.name}: block {name} has no JSON and does not say it was not measured"
                )
