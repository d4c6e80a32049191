"""Storage: the sqlite index and the item files, adding items and reading them back.

    <root>/index.sqlite3          one row per item (WAL mode, busy timeout: several processes)
    <root>/items/<id>.<ext>       the image as uploaded (PNG when it came as an array)
    <root>/items/<id>.json        the prediction: class, probabilities, confidence, status, mask PNG

`InboxStore.add` never raises: it answers an `AddResult` (stored, or refused because the inbox
is full by count or bytes, unwritable, a disk error or an unusable answer) and counts the
outcome (`counters`: stored, refused_full, errors). Files are written to a temporary name,
fsynced and renamed into place while holding the index's write lock, then the row is inserted
in the same transaction: a row never names a missing file. What a crash in between leaves,
`cleanup` (run when an inbox is first opened) removes; the limits and that cleanup are
`retention`'s.

The index also keeps the reviewers' votes (table `votes`, one row per item and reviewer, with
an uploaded mask as a PNG blob), listed with each item. An index from before the votes
(`PRAGMA user_version` 0) is migrated when first opened: the table and the column
`items.reviewer_identity` are added, under the write lock, once.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time as _time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from defectflow.files import fsync_dir, write_temp
from defectflow.inference.postprocessing import UNKNOWN_DEFECT
from defectflow.serving.inbox.errors import InboxError, InvalidReview, ItemNotFound, ItemNotPending
from defectflow.serving.inbox.retention import (
    TEMP_MAX_AGE_S,
    Full,
    check_room,
    full_message,
    never_fits,
    pending_usage,
    remove_leftovers,
)
from defectflow.serving.inbox.trust import disputed, votes_from_rows

log = logging.getLogger("defectflow.serving.inbox")

INDEX_FILE = "index.sqlite3"
ITEMS_DIR = "items"
BUSY_TIMEOUT_MS = 30_000
_EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "bmp": ".bmp", "tiff": ".tiff"}
STATES = ("pending", "reviewed", "discarded")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    model TEXT NOT NULL,
    predicted_class TEXT NOT NULL,
    confidence REAL,
    prediction_status TEXT,
    state TEXT NOT NULL DEFAULT 'pending',
    image_file TEXT,
    record_file TEXT,
    bytes INTEGER NOT NULL DEFAULT 0,
    label TEXT,
    reviewer TEXT,
    reviewed_at REAL,
    written TEXT
);
CREATE INDEX IF NOT EXISTS items_state_created ON items(state, created);
"""
#: The index's `PRAGMA user_version`: 0 had no votes, 1 adds them (`_migrate`).
SCHEMA_VERSION = 1
_VOTES = """
CREATE TABLE IF NOT EXISTS votes (
    item_id TEXT NOT NULL,
    reviewer TEXT NOT NULL,
    identity TEXT NOT NULL,
    label TEXT NOT NULL,
    mask_choice TEXT NOT NULL,
    mask_png BLOB,
    voted_at REAL NOT NULL,
    PRIMARY KEY (item_id, reviewer)
)
"""
_VOTE_FIELDS = "item_id, reviewer, identity, label, mask_choice, voted_at"


@dataclass(frozen=True)
class AddResult:
    stored: bool
    #: The item id when stored.
    id: str | None = None
    #: Why not: full_items | full_bytes | unwritable | disk_error | invalid.
    reason: str | None = None
    message: str = ""


@dataclass
class _Counters:
    stored: int = 0
    refused_full: int = 0
    errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def bump(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)

    def as_dict(self) -> dict[str, int]:
        with self.lock:
            return {"stored": self.stored, "refused_full": self.refused_full, "errors": self.errors}


def png_bytes(image: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", image)
    if not ok:  # pragma: no cover - cv2 encodes any uint8 array
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def _image_bytes(image: bytes | np.ndarray) -> tuple[bytes, str]:
    """The bytes to store and their format name; ValueError for what is not an image."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        from defectflow.serving.uploads import sniff_format

        data = bytes(image)
        fmt = sniff_format(data)
        if fmt not in _EXTENSIONS:
            raise ValueError(f"not a PNG, JPEG, BMP or TIFF image (sniffed: {fmt})")
        return data, fmt
    array = np.asarray(image)
    if array.dtype != np.uint8 or not (
        array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)
    ):
        raise ValueError(
            f"expected an RGB uint8 (H, W, 3) or gray (H, W) array, got {array.dtype} {array.shape}"
        )
    if array.ndim == 3:
        array = np.ascontiguousarray(array[:, :, ::-1])  # RGB -> BGR for OpenCV
    return png_bytes(array), "png"


def _prediction_record(
    item_id: str, answer: dict, model_tag: str, created: float, fmt: str, image_file: str
) -> dict:
    if not isinstance(answer, dict):
        raise ValueError(f"the answer must be a dict, got {type(answer).__name__}")
    label = answer.get("class")
    probabilities = answer.get("probabilities")
    # An unknown_defect answer (the anomaly score's) has no probability of its own, only `confidence`.
    known = isinstance(probabilities, dict) and (
        label in probabilities or (label == UNKNOWN_DEFECT and "confidence" in answer)
    )
    if not isinstance(label, str) or not known:
        raise ValueError("the answer needs `class` and `probabilities` (with that class)")
    mask_b64 = answer.get("mask_png_base64")
    if not isinstance(mask_b64, str):
        raise ValueError("the answer needs `mask_png_base64`")
    base64.b64decode(mask_b64, validate=True)
    confidence = answer["confidence"] if "confidence" in answer else probabilities[label]
    return {
        "id": item_id,
        "time": created,
        "time_iso": _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime(created)),
        "model": str(model_tag),
        "class": label,
        "classes": list(probabilities),
        "probabilities": {str(k): float(v) for k, v in probabilities.items()},
        "confidence": float(confidence),
        "status": str(answer.get("status", "accepted")),
        "is_defective": bool(answer.get("is_defective", False)),
        "anomaly_score": answer.get("anomaly_score"),
        "defect_area_fraction": answer.get("defect_area_fraction"),
        "mask_png_base64": mask_b64,
        "mask_size": answer.get("mask_size"),
        "request_id": answer.get("request_id"),
        "image_file": image_file,
        "image_format": fmt,
    }


class InboxStore:
    """The index and item files: add, list, get, stats. Safe to use from threads and processes."""

    def __init__(
        self, root: str | Path, max_items: int = 10_000, max_bytes: int = 2_000_000_000
    ) -> None:
        self.root = Path(root)
        self.items_dir = self.root / ITEMS_DIR
        self.index_path = self.root / INDEX_FILE
        self.max_items = int(max_items)
        self.max_bytes = int(max_bytes)
        self._counters = _Counters()
        self._opened = False
        self._open_lock = threading.Lock()

    @property
    def counters(self) -> dict[str, int]:
        return self._counters.as_dict()

    # ------------------------------------------------------------------ the index

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.index_path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None
        )
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous=FULL")
        conn.row_factory = sqlite3.Row
        return conn

    def _open(self) -> None:
        """Create the folders and index (once per instance), then clear crash leftovers."""
        if self._opened:
            return
        with self._open_lock:
            if self._opened:
                return
            self.items_dir.mkdir(parents=True, exist_ok=True)
            conn = self._connect()
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
                _migrate(conn)
            finally:
                conn.close()
            self._opened = True
        try:
            self.cleanup()
        except (OSError, sqlite3.Error) as exc:
            log.warning("inbox %s: cleanup failed: %s", self.root, exc)

    def _opened_or_error(self) -> None:
        try:
            self._open()
        except (OSError, sqlite3.Error) as exc:
            raise InboxError(f"cannot open the inbox at {self.root}: {exc}") from exc

    @contextlib.contextmanager
    def _write_transaction(self):
        """A connection inside BEGIN IMMEDIATE (the index's write lock); commit or roll back."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    def cleanup(self, temp_max_age_s: float = TEMP_MAX_AGE_S) -> list[str]:
        """Remove what a crashed write left: temporary files older than `temp_max_age_s` and
        item files no index row names (`retention.remove_leftovers`). Returns the names removed."""
        with self._write_transaction() as conn:
            removed = remove_leftovers(conn, self.items_dir, temp_max_age_s)
        if removed:
            log.warning(
                "inbox %s: removed %d leftover file(s) of interrupted writes",
                self.root,
                len(removed),
            )
        return removed

    @staticmethod
    def _discard_files(*paths: Path | None) -> None:
        for path in paths:
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ adding

    def add(
        self, image: bytes | np.ndarray, answer: dict, model_tag: str, time: float | None = None
    ) -> AddResult:
        """Store an image and its prediction for review. Never raises: see `AddResult`."""
        try:
            return self._add(image, answer, model_tag, time)
        except Exception as exc:  # noqa: BLE001 - the caller is answering a prediction
            self._counters.bump("errors")
            log.exception("inbox %s: could not store an item", self.root)
            return AddResult(False, reason="disk_error", message=f"{type(exc).__name__}: {exc}")

    def _add(self, image, answer, model_tag, time) -> AddResult:
        """Check the item, write its files to temporary names, then (under the index's write
        lock) check the room, rename them into place and insert the row. Kept in one piece: each
        failure undoes exactly what the steps before it wrote, which reads best in one place."""
        created = float(time) if time is not None else _time.time()
        item_id = (
            f"{_time.strftime('%Y%m%dT%H%M%S', _time.gmtime(created))}-{uuid.uuid4().hex[:12]}"
        )
        try:
            data, fmt = _image_bytes(image)
            image_file = f"{item_id}{_EXTENSIONS[fmt]}"
            record = _prediction_record(item_id, answer, model_tag, created, fmt, image_file)
        except (ValueError, TypeError, KeyError) as exc:
            self._counters.bump("errors")
            return AddResult(False, reason="invalid", message=str(exc))
        record_bytes = json.dumps(record, separators=(",", ":")).encode("utf-8")
        size = len(data) + len(record_bytes)
        reason = never_fits(size, self.max_items, self.max_bytes)
        if reason is not None:
            return self._refuse_full(reason)
        try:
            self._open()
            tmp_image = write_temp(self.items_dir, data)
        except (OSError, sqlite3.Error) as exc:
            self._counters.bump("errors")
            log.warning("inbox %s is not writable: %s", self.root, exc)
            return AddResult(False, reason="unwritable", message=f"{type(exc).__name__}: {exc}")
        tmp_record = None
        final = [self.items_dir / image_file, self.items_dir / f"{item_id}.json"]
        renamed: list[Path] = []
        try:
            tmp_record = write_temp(self.items_dir, record_bytes)
            with self._write_transaction() as conn:
                check_room(conn, size, self.max_items, self.max_bytes)
                for tmp, path in zip((tmp_image, tmp_record), final, strict=True):
                    os.replace(tmp, path)
                    renamed.append(path)
                fsync_dir(self.items_dir)
                self._insert(
                    conn,
                    {
                        "id": item_id,
                        "created": created,
                        "model": record["model"],
                        "predicted_class": record["class"],
                        "confidence": record["confidence"],
                        "prediction_status": record["status"],
                        "image_file": final[0].name,
                        "record_file": final[1].name,
                        "bytes": size,
                    },
                )
        except Full as full:
            self._discard_files(tmp_image, tmp_record)
            return self._refuse_full(full.reason)
        except (OSError, sqlite3.Error) as exc:
            self._discard_files(tmp_image, tmp_record, *renamed)
            self._counters.bump("errors")
            log.warning("inbox %s: could not store an item: %s", self.root, exc)
            return AddResult(False, reason="disk_error", message=f"{type(exc).__name__}: {exc}")
        except BaseException:
            self._discard_files(tmp_image, tmp_record, *renamed)
            raise
        self._counters.bump("stored")
        return AddResult(True, id=item_id)

    def _insert(self, conn: sqlite3.Connection, row: dict) -> None:
        conn.execute(
            "INSERT INTO items (id, created, model, predicted_class, confidence, prediction_status, state, "
            "image_file, record_file, bytes) VALUES (:id, :created, :model, :predicted_class, :confidence, "
            ":prediction_status, 'pending', :image_file, :record_file, :bytes)",
            row,
        )

    def _refuse_full(self, reason: str) -> AddResult:
        self._counters.bump("refused_full")
        return AddResult(
            False, reason=reason, message=full_message(reason, self.max_items, self.max_bytes)
        )

    # ------------------------------------------------------------------ reading

    def _row(self, conn: sqlite3.Connection, item_id: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM items WHERE id = ?", (str(item_id),)).fetchone()
        if row is None:
            raise ItemNotFound(f"no inbox item {item_id!r}")
        return row

    @staticmethod
    def _summary(row: sqlite3.Row) -> dict:
        return {
            "id": row["id"],
            "time": row["created"],
            "time_iso": _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime(row["created"])),
            "predicted_class": row["predicted_class"],
            "confidence": row["confidence"],
            "prediction_status": row["prediction_status"],
            "model": row["model"],
            "status": row["state"],
            "bytes": row["bytes"],
            "label": row["label"],
            "reviewer": row["reviewer"],
            "reviewer_identity": row["reviewer_identity"],
            "reviewed_at": row["reviewed_at"],
            "written": json.loads(row["written"]) if row["written"] else None,
        }

    @staticmethod
    def _with_votes(summary: dict, rows: list[sqlite3.Row]) -> dict:
        votes = votes_from_rows(rows)
        summary["votes"] = [v.as_dict() for v in votes]
        summary["disputed"] = disputed(votes)
        return summary

    def list(self, status: str | None = "pending", limit: int | None = None) -> list[dict]:
        """Items in `status` (pending | reviewed | discarded; None: all), oldest first."""
        if status is not None and status not in STATES:
            raise InvalidReview(f"unknown status {status!r}: expected one of {', '.join(STATES)}")
        self._opened_or_error()
        query = (
            "SELECT * FROM items" + (" WHERE state = ?" if status else "") + " ORDER BY created, id"
        )
        params: tuple = (status,) if status else ()
        if limit is not None:
            query += " LIMIT ?"
            params += (int(limit),)
        conn = self._connect()
        try:
            rows = conn.execute(query, params).fetchall()
            votes: dict[str, list] = {}
            for vote in conn.execute(
                f"SELECT {', '.join('v.' + f for f in _VOTE_FIELDS.split(', '))} FROM votes v "
                "JOIN items i ON i.id = v.item_id"
                + (" WHERE i.state = ?" if status else "")
                + " ORDER BY v.voted_at",
                (status,) if status else (),
            ):
                votes.setdefault(vote["item_id"], []).append(vote)
        finally:
            conn.close()
        return [self._with_votes(self._summary(r), votes.get(r["id"], [])) for r in rows]

    def _vote_rows(self, conn: sqlite3.Connection, item_id: str) -> list[sqlite3.Row]:
        return conn.execute(
            f"SELECT {_VOTE_FIELDS} FROM votes WHERE item_id = ? ORDER BY voted_at", (item_id,)
        ).fetchall()

    def stats(self) -> dict:
        """Pending items and bytes, with the limits and this instance's counters."""
        self._opened_or_error()
        conn = self._connect()
        try:
            count, used = pending_usage(conn)
        finally:
            conn.close()
        return {
            "pending": count,
            "pending_bytes": used,
            "max_items": self.max_items,
            "max_bytes": self.max_bytes,
            **self.counters,
        }

    def get(self, item_id: str) -> dict:
        """An item: its summary, the stored prediction and, while pending, `image_bytes`."""
        self._opened_or_error()
        conn = self._connect()
        try:
            row = self._row(conn, item_id)
            item = self._with_votes(self._summary(row), self._vote_rows(conn, row["id"]))
        finally:
            conn.close()
        if row["state"] == "pending":
            try:
                record = json.loads((self.items_dir / row["record_file"]).read_text())
                item["image_bytes"] = (self.items_dir / row["image_file"]).read_bytes()
            except (OSError, ValueError) as exc:
                conn = self._connect()
                try:
                    state = self._row(conn, item_id)["state"]
                finally:
                    conn.close()
                if state != "pending":  # reviewed or discarded meanwhile: its files are gone
                    raise ItemNotPending(f"inbox item {item_id} is already {state}") from exc
                raise InboxError(f"inbox item {item_id}: cannot read its files: {exc}") from exc
            item["prediction"] = {k: v for k, v in record.items() if k not in ("id", "image_file")}
        return item


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring an index to SCHEMA_VERSION under its write lock (another process may be opening it
    too): version 0 (an index from before the votes) gets `items.reviewer_identity` and the
    `votes` table."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version < 1:
            columns = {r[1] for r in conn.execute("PRAGMA table_info(items)")}
            if "reviewer_identity" not in columns:
                conn.execute("ALTER TABLE items ADD COLUMN reviewer_identity TEXT")
            conn.execute(_VOTES)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            log.info("inbox index migrated from version %d to %d", version, SCHEMA_VERSION)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
