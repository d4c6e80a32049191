"""Write the package map of docs/architecture.md from the package and module docstrings.

    python scripts/package_map.py            rewrite the map between its markers
    python scripts/package_map.py --check    exit 1 when the map is not current (make test)

Each package's row comes from its `__init__` docstring (first line, and its "May import"
paragraph); each module's from the first sentence of its docstring, so the map cannot drift
from the code it describes.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import doc_markers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "defectflow"
#: The root folders installed as packages (pyproject.toml's package-dir), shown where they live.
MAPPED = {
    "defectflow.orchestration.flows": REPO / "flows",
    "defectflow.orchestration.tasks": REPO / "tasks",
}
DOC = REPO / "docs" / "architecture.md"
BEGIN, END = "<!-- package-map: begin (scripts/package_map.py) -->", "<!-- package-map: end -->"


def docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def first_sentence(text: str) -> str:
    paragraph = " ".join(text.strip().split("\n\n")[0].split())
    match = re.match(r"(.+?[.])(\s+[A-Z`(]|$)", paragraph)
    sentence = match.group(1) if match else paragraph
    return sentence.rstrip(".:;").replace("|", "\\|")


def may_import(text: str) -> str:
    for paragraph in text.split("\n\n"):
        if paragraph.strip().startswith("May import"):
            return " ".join(paragraph.split()).replace("|", "\\|")
    return ""


def packages() -> list[tuple[str, Path]]:
    found = [("defectflow", SRC)]
    found += [
        ("defectflow." + ".".join(p.parent.relative_to(SRC).parts), p.parent)
        for p in sorted(SRC.rglob("__init__.py"))
        if p.parent != SRC and "__pycache__" not in p.parts
    ]
    found += sorted(MAPPED.items())
    return sorted(found, key=lambda item: item[0])


def render() -> str:
    lines = [BEGIN, ""]
    for name, folder in packages():
        shown = folder.relative_to(REPO).as_posix() + "/"
        init = docstring(folder / "__init__.py")
        lines += [f"### `{name}` (`{shown}`)", "", first_sentence(init) + "."]
        rule = may_import(init)
        if rule:
            lines += ["", f"*{rule}*"]
        lines += ["", "| module | what it holds |", "|---|---|"]
        for module in sorted(folder.glob("*.py")):
            if module.name == "__init__.py":
                continue
            lines.append(f"| `{module.stem}` | {first_sentence(docstring(module))} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail when the map is not current")
    args = parser.parse_args(argv)
    body = render().removeprefix(BEGIN).removesuffix(END)
    return doc_markers.rewrite(
        DOC, BEGIN, END, body, args.check, f"python scripts/{Path(__file__).name}"
    )


if __name__ == "__main__":
    sys.exit(main())
