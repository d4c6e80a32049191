"""What several command groups share: the config arguments, the Bento name, plain-text tables."""

from __future__ import annotations

import argparse

BENTO_NAME = "defectflow"


def configurable(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--config NAME` and trailing `key=value` overrides, for commands that load a config."""
    p.add_argument("--config", default="default", help="config name in configs/ (default: default)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def table(headers: list[str], rows: list[list]) -> str:
    """Left-aligned columns under a dashed rule."""
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
