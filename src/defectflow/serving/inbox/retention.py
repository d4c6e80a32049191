"""Retention: how much the inbox keeps, and clearing what interrupted writes left behind.

Limits: when `max_items` pending items or `max_bytes` of pending files would be exceeded, a
new item is refused (`full_items` / `full_bytes`, counted as `refused_full`); nothing pending
is ever deleted to make room. Reviewed and discarded items keep their index row, not their
files, and count against neither limit.

Leftovers: a crash between writing an item's files and inserting its row leaves at most a
temporary file or a file no pending row names; `remove_leftovers` deletes both.
"""

from __future__ import annotations

import sqlite3
import time as _time
from pathlib import Path

from defectflow.files import TMP_PREFIX

#: Seconds a temporary file may live before `cleanup` takes it for a crashed write's leftover
#: (a live writer in another process may be between writing and renaming it).
TEMP_MAX_AGE_S = 300.0


class Full(Exception):
    """The inbox has no room for an item; `reason` is full_items or full_bytes."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def pending_usage(conn: sqlite3.Connection) -> tuple[int, int]:
    """(items, bytes) of the pending items."""
    count, used = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM items WHERE state = 'pending'"
    ).fetchone()
    return count, used


def never_fits(size: int, max_items: int, max_bytes: int) -> str | None:
    """full_bytes or full_items when an item of `size` bytes cannot fit even in an empty
    inbox (checked before anything is written); else None."""
    if size > max_bytes:
        return "full_bytes"
    if max_items < 1:
        return "full_items"
    return None


def check_room(conn: sqlite3.Connection, size: int, max_items: int, max_bytes: int) -> None:
    """Raise `Full` unless one more item of `size` bytes fits beside the pending ones. Called
    inside the index's write transaction, so no other writer adds one meanwhile."""
    count, used = pending_usage(conn)
    if count + 1 > max_items or used + size > max_bytes:
        raise Full("full_items" if count + 1 > max_items else "full_bytes")


def full_message(reason: str, max_items: int, max_bytes: int) -> str:
    limit = f"{max_items} items" if reason == "full_items" else f"{max_bytes} bytes"
    return f"the inbox is full ({limit}): review or discard items"


def remove_leftovers(
    conn: sqlite3.Connection, items_dir: Path, temp_max_age_s: float = TEMP_MAX_AGE_S
) -> list[str]:
    """Remove temporary files older than `temp_max_age_s` and item files no pending row names;
    the names removed. `conn` holds the index's write lock: no writer renames a file meanwhile."""
    removed = []
    now = _time.time()
    named = set()
    for row in conn.execute("SELECT image_file, record_file FROM items WHERE state = 'pending'"):
        named.update(n for n in (row["image_file"], row["record_file"]) if n)
    for path in items_dir.iterdir():
        if path.name.startswith(TMP_PREFIX):
            try:
                if now - path.stat().st_mtime < temp_max_age_s:
                    continue
            except FileNotFoundError:
                continue
        elif path.name in named:
            continue
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed
