"""Rewrite the generated part of a doc, between a begin and an end marker, or check it is current.

Shared by the doc generators (package_map.py, config_reference.py): they compute the text,
this puts it in place.
"""

from __future__ import annotations

import sys
from pathlib import Path


def rewrite(doc: Path, begin: str, end: str, body: str, check: bool, command: str) -> int:
    """Put `begin` + `body` + `end` in place of the marked part of `doc`. With `check`, write
    nothing and return 1 when the doc differs; 2 when the markers are missing."""
    text = doc.read_text()
    if begin not in text or end not in text:
        print(f"{doc}: no {begin} ... {end} markers", file=sys.stderr)
        return 2
    head, rest = text.split(begin, 1)
    updated = head + begin + body + end + rest.split(end, 1)[1]
    if check:
        if updated != text:
            print(f"{doc} is not current: run {command}", file=sys.stderr)
            return 1
        return 0
    if updated != text:
        doc.write_text(updated)
        print(f"wrote {doc}")
    return 0
