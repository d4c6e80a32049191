"""benchmarks/doc_tables.py: benchmark JSON into the docs' tables, between markers."""

import importlib.util
import json

import pytest
from helpers_processes import REPO_ROOT

_spec = importlib.util.spec_from_file_location(
    "doc_tables", REPO_ROOT / "benchmarks" / "doc_tables.py"
)
doc_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(doc_tables)

RESULTS = {
    "git_head": "abc1234567 a subject",
    "machine": {"cpus": 2, "load_avg_1m_start": 0.3, "load_avg_1m_end": 1.2},
    "goals": [
        {"figure": "p50 (ms)", "measured": 18.25, "goal": None, "met": None},
        {"figure": "ratio", "measured": 1.556, "goal": "<= 1.15", "met": False},
        {"figure": "images/s", "measured": 83.2, "goal": ">= 60", "met": True},
    ],
}


def test_a_block_is_replaced_by_the_table_and_the_rest_is_kept(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps(RESULTS))
    doc = tmp_path / "DOC.md"
    doc.write_text(
        "before\n<!-- benchmark: bench -->\nold table\n<!-- /benchmark: bench -->\nafter\n"
        "<!-- benchmark: absent -->\nkept\n<!-- /benchmark: absent -->\n"
    )
    done = doc_tables.rewrite(doc, tmp_path)
    text = doc.read_text()
    assert text.startswith("before\n<!-- benchmark: bench -->\n| figure | measured | goal | |")
    assert (
        "| ratio | 1.556 | <= 1.15 | **missed** |" in text
        and "| images/s | 83.2 | >= 60 | met |" in text
    )
    assert "old table" not in text and "commit abc1234567;" in text and "after\n" in text
    assert "kept" in text and any("absent" in line and "left as it was" in line for line in done)
    assert doc_tables.rewrite(doc, tmp_path) and doc.read_text() == text  # idempotent


@pytest.mark.parametrize(
    "broken", ["<!-- benchmark: a -->\nx\n", "<!-- benchmark: a -->\n<!-- /benchmark: a -->\n" * 2]
)
def test_an_open_or_repeated_block_is_refused(tmp_path, broken):
    doc = tmp_path / "DOC.md"
    doc.write_text(broken)
    with pytest.raises(SystemExit):
        doc_tables.rewrite(doc, tmp_path)
