"""Writing files so that a reader, or a process killed half-way, never sees half of one:
a temporary file in the same folder, fsynced, renamed into place, then the folder fsynced.

Standard library only: the serving Bento (the review inbox) uses it too.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

#: Name prefix of the temporary files (what a cleanup after a crash looks for).
TMP_PREFIX = ".tmp-"


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(folder: Path, data: bytes) -> Path:
    """`data` in a new temporary file of `folder`, fsynced; the caller renames it into place."""
    tmp = Path(folder) / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def atomic_write(path: Path, data: bytes) -> None:
    """Write `path` so a reader sees either nothing or all of it (temp + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_temp(path.parent, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
