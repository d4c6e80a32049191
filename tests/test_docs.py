"""The README and docs/ link to each other correctly: every relative link names an existing file
and every #anchor an existing heading (GitHub's anchor rules); every docs page starts with a
title and a link back to the README, and the README links to every page. Files only, no network."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
from helpers_processes import REPO_ROOT, load_file_module

DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
PAGES = [REPO_ROOT / "README.md", *DOCS]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1", re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def without_code(text: str) -> str:
    """The text with fenced blocks removed (their `# comments` are no headings, their brackets
    no links); code spans are kept out of link search by `links`."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: Counter[str] = Counter()
    result = set()
    for heading in HEADING.findall(without_code(path.read_text())):
        base = slug(heading)
        result.add(base if not seen[base] else f"{base}-{seen[base]}")
        seen[base] += 1
    return result


def links(path: Path) -> list[str]:
    """Relative link targets of a Markdown file (web and mail links left out)."""
    text = CODE_SPAN.sub("", without_code(path.read_text()))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z+.-]*:", t)]


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        (
            "Review loop: uncertain answers become tomorrow's training data",
            "review-loop-uncertain-answers-become-tomorrows-training-data",
        ),
        (
            "Inspecting files offline: `defectflow predict`",
            "inspecting-files-offline-defectflow-predict",
        ),
        ("Prefect UI, nightly retrain and scale-out", "prefect-ui-nightly-retrain-and-scale-out"),
        ("The container as shipped, measured", "the-container-as-shipped-measured"),
    ],
)
def test_anchor_rules(heading, anchor):
    assert slug(heading) == anchor


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        name, _, anchor = target.partition("#")
        dest = (page.parent / name).resolve() if name else page
        if not dest.exists():
            broken.append(
                f"{target}: no file {dest.relative_to(REPO_ROOT) if dest.is_relative_to(REPO_ROOT) else dest}"
            )
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_a_docs_page_has_a_title_links_back_and_is_linked_from_the_readme(page):
    lines = page.read_text().splitlines()
    assert lines[0].startswith("# "), f"{page.name} starts without a '# Title'"
    assert any("](../README.md" in line for line in lines[1:4]), (
        f"{page.name}: no link back to the README near the top"
    )
    assert f"docs/{page.name}" in links(REPO_ROOT / "README.md"), (
        f"the README does not link {page.name}"
    )


def test_the_checks_catch_a_broken_link(tmp_path):
    (tmp_path / "a.md").write_text(
        "# A title\n\n```sh\n# not a heading [x](nowhere.md)\n```\n"
        "[b](b.md#missing) [a](#a-title) `[c](c.md)` [web](https://example.org)\n"
    )
    (tmp_path / "b.md").write_text("# B\n")
    assert links(tmp_path / "a.md") == ["b.md#missing", "#a-title"]
    assert anchors(tmp_path / "a.md") == {"a-title"} and "missing" not in anchors(tmp_path / "b.md")


def test_doc_tables_rewrites_every_page_and_finds_the_container_table():
    doc_tables = load_file_module("benchmarks", "doc_tables")
    assert doc_tables.default_docs() == PAGES
    blocks = [
        m.group("name") for page in PAGES for m in doc_tables.BLOCK.finditer(page.read_text())
    ]
    assert blocks.count("container_bench") == 1


def test_the_docs_pages_other_files_name_exist():
    """Comments and docstrings that send a reader to docs/<page>.md name a page that exists."""
    files = [
        REPO_ROOT / name
        for name in ("Makefile", "prefect.yaml", "bentofile.yaml", "pyproject.toml", "service.py")
    ]
    for folder in (
        "src",
        "tasks",
        "flows",
        "scripts",
        "benchmarks",
        "tests",
        "examples",
        "configs",
    ):
        files += [
            p
            for p in (REPO_ROOT / folder).rglob("*")
            if p.suffix in (".py", ".yaml", ".md", ".html")
        ]
    missing = {
        f"{path.relative_to(REPO_ROOT)}: {name}"
        for path in files
        if path.is_file()
        for name in re.findall(r"\bdocs/([\w-]+\.md)\b", path.read_text(errors="replace"))
        if not (REPO_ROOT / "docs" / name).is_file()
    }
    assert not missing, sorted(missing)


def _script(name: str):
    return load_file_module("scripts", name)


def test_the_package_map_is_generated_from_the_current_docstrings(capsys):
    """docs/architecture.md's package map equals what scripts/package_map.py makes of the code."""
    assert _script("package_map").main(["--check"]) == 0, capsys.readouterr().err


def test_every_package_says_what_belongs_there_and_what_it_may_import():
    package_map = _script("package_map")
    for name, folder in package_map.packages():
        if name == "defectflow":
            continue
        text = package_map.docstring(folder / "__init__.py")
        assert package_map.first_sentence(text), f"{name}: its __init__ has no docstring"
        assert package_map.may_import(text), f"{name}: its __init__ docstring has no 'May import'"


def test_the_package_map_check_fails_when_a_module_is_added(tmp_path, monkeypatch):
    package_map = _script("package_map")
    doc = tmp_path / "architecture.md"
    doc.write_text(f"# A\n\n{package_map.BEGIN}\n{package_map.END}\n")
    monkeypatch.setattr(package_map, "DOC", doc)
    monkeypatch.setattr(package_map, "REPO", REPO_ROOT)
    assert package_map.main(["--check"]) == 1
    assert package_map.main([]) == 0 and package_map.main(["--check"]) == 0
    assert "| `predictor` | Loading a trained model artifact" in doc.read_text()


def test_the_results_pages_are_generated_from_their_json(capsys):
    assert _script("results_docs").main(["--check"]) == 0, capsys.readouterr().err


def test_a_results_page_shows_what_the_run_measured(tmp_path):
    results_docs = _script("results_docs")
    data = json.loads((REPO_ROOT / "docs" / "results" / "demo.json").read_text())
    data["runs"][0]["metrics"]["accuracy"] = 0.123456
    from defectflow.evaluation import results

    data["summary"] = results.summarize(data["runs"])
    page = results_docs.render("demo", data)
    assert "| overall class accuracy | 0.123 ± 0.000 | 0.123 |" in page
    assert data["commit"] in page and data["machine"] in page and data["measured"] in page


def _reproduce_results(folder, seeds=(42, 43, 44)):
    """A `defectflow reproduce` results folder as the flow writes it, from demo.json's run."""
    run = json.loads((REPO_ROOT / "docs" / "results" / "demo.json").read_text())["runs"][0]
    runs = [
        {
            **run,
            "seed": seed,
            "run_dir": str(folder / f"run{seed}"),
            "stage_seconds": {"tune-hyperparameters": 60.0 if i == 0 else 0.1, "train-model": 90.0},
            "wall_seconds": 200.0,
        }
        for i, seed in enumerate(seeds)
    ]
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"runs": runs, "summary": {}}))
    return runs


def test_a_category_page_sets_its_runs_beside_the_published_figures_and_targets(
    tmp_path, monkeypatch
):
    results_docs = _script("results_docs")
    pages = tmp_path / "results"
    pages.mkdir()
    shutil.copy(REPO_ROOT / "docs" / "results" / "anchors.yaml", pages)
    monkeypatch.setattr(results_docs, "RESULTS", pages)
    monkeypatch.setattr(results_docs, "ANCHORS", pages / "anchors.yaml")
    monkeypatch.setattr(results_docs, "REPO", tmp_path)  # where it says it wrote
    _reproduce_results(tmp_path / "capsule-run")
    assert results_docs.main(["add", "capsule", str(tmp_path / "capsule-run")]) == 0
    recorded = json.loads((pages / "capsule.json").read_text())
    assert recorded["category"] == "capsule" and recorded["kind"] == "reproduce"
    page = (pages / "capsule.md").read_text()
    # demo's figures three times: accuracy 0.923 against the seed project's 0.83 and target 0.95
    assert "| overall class accuracy | 0.830 | — | ≥ 0.950 | **0.923 ± 0.000** | no |" in page
    assert "| image AUROC, defect vs good | — | 0.981 | ≥ 0.995 | **0.964 ± 0.000** | no |" in page
    assert "| answers accepted without review (coverage) | — | — | ≥ 0.900 | **0.538" in page
    assert (
        "accepted answers on test: 0.929 ± 0.000; the confidence threshold was chosen for 0.99"
        in page
    )
    assert "| tune-hyperparameters | 60.0 | 0.1 | 0.1 | 60.2 |" in page
    # pill has no run yet: its page has the published figure and the targets, and says so
    pill = (pages / "pill.md").read_text()
    assert "Not measured yet: `make reproduce CATEGORY=pill`" in pill
    assert "| image AUROC, defect vs good | 0.966 | ≥ 0.970 | not measured | — |" in pill
    assert results_docs.main(["--check"]) == 0


def test_the_anchors_name_only_metrics_the_results_have():
    from defectflow.evaluation import results

    anchors = _script("results_docs").load_anchors()
    for category, figures in anchors["categories"].items():
        for source, values in figures.items():
            assert source in anchors["sources"], (category, source)
            assert set(values) <= set(results.LABELS), (category, source)
            assert all(0 < v <= 1 for v in values.values()), (category, source)


def test_the_configuration_reference_is_generated_from_the_schema(capsys):
    assert _script("config_reference").main(["--check"]) == 0, capsys.readouterr().err


def test_the_configuration_reference_has_a_row_for_every_schema_key():
    from omegaconf import OmegaConf

    from defectflow.config import Config

    def keys(node, prefix=""):
        for name, value in node.items():
            if OmegaConf.is_dict(value):
                yield from keys(value, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    expected = set(keys(OmegaConf.structured(Config)))
    listed = {row[0] for row in _script("config_reference").rows()}
    assert listed == expected and len(expected) > 100
