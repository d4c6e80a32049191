"""The key table of docs/configuration.md, generated from the schema and configs/default.yaml.

    python scripts/config_reference.py            rewrite the table between its markers
    python scripts/config_reference.py --check    exit 1 when it is not current (make test)

One row per key of the schema (`defectflow.config.Config`, typed dataclasses): its type, its
default as `configs/default.yaml` sets it, and what it means (the comment beside it in
default.yaml, else the `#:` comment above the field in the schema).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import re
import sys
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import doc_markers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "configuration.md"
SCHEMA = REPO / "src" / "defectflow" / "config.py"
DEFAULTS = REPO / "configs" / "default.yaml"
BEGIN, END = (
    "<!-- config-keys: begin (scripts/config_reference.py) -->",
    "<!-- config-keys: end -->",
)


def schema_comments() -> dict[tuple[str, str], str]:
    """(class name, field) -> the `#:` comment lines above the field in config.py."""
    lines = SCHEMA.read_text().splitlines()
    comments = {}
    for node in ast.walk(ast.parse(SCHEMA.read_text())):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                above, i = [], item.lineno - 2
                while i >= 0 and lines[i].strip().startswith("#:"):
                    above.insert(0, lines[i].strip()[2:].strip())
                    i -= 1
                if above:
                    comments[(node.name, item.target.id)] = " ".join(above)
    return comments


def yaml_comments() -> dict[str, str]:
    """Dotted key -> the comment beside it in default.yaml (nesting from the indentation)."""
    found, stack = {}, []
    for line in DEFAULTS.read_text().splitlines():
        match = re.match(r"^( *)([A-Za-z_][\w]*):(.*)$", line)
        if not match:
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3)
        stack = [(i, k) for i, k in stack if i < indent] + [(indent, key)]
        if "#" in rest:
            found[".".join(k for _, k in stack)] = rest.split("#", 1)[1].strip()
    return found


def _type_name(hint) -> str:
    text = getattr(hint, "__name__", None) if not typing.get_args(hint) else None
    return text or str(hint).replace("typing.", "").replace("NoneType", "None")


def rows() -> list[tuple[str, str, str, str]]:
    from omegaconf import OmegaConf

    from defectflow.config import Config

    # Unresolved, so ${oc.env:...} and ${paths.home} show as written, whatever the environment.
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(DEFAULTS))
    defaults = OmegaConf.to_container(merged, resolve=False)
    from_schema, from_yaml = schema_comments(), yaml_comments()
    out = []

    def walk(cls, prefix: str, values: dict) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, hint = f"{prefix}{f.name}", hints[f.name]
            value = values.get(f.name)
            if dataclasses.is_dataclass(hint):
                walk(hint, key + ".", value or {})
                continue
            meaning = from_yaml.get(key) or from_schema.get((cls.__name__, f.name), "")
            parent = prefix.rstrip(".")
            while not meaning and parent:  # a section's comment covers its uncommented keys
                meaning = f"({from_yaml[parent]})" if parent in from_yaml else ""
                parent = parent.rpartition(".")[0]
            shown = json.dumps(value) if not isinstance(value, str) else value
            out.append((key, _type_name(hint), shown, meaning))

    walk(Config, "", defaults)
    return out


def render() -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [BEGIN, "", "| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {cell(t)} | `{cell(d)}` | {cell(m)} |" for k, t, d, m in rows()]
    return "\n".join([*lines, "", END])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail when the table is not current")
    args = parser.parse_args(argv)
    body = render().removeprefix(BEGIN).removesuffix(END)
    return doc_markers.rewrite(
        DOC, BEGIN, END, body, args.check, f"python scripts/{Path(__file__).name}"
    )


if __name__ == "__main__":
    sys.exit(main())
