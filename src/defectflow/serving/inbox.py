"""The review inbox: images the model was uncertain about, kept for a person to label.

    <root>/index.sqlite3          one row per item (WAL mode, busy timeout: several processes)
    <root>/items/<id>.<ext>       the image as uploaded (PNG when it came as an array)
    <root>/items/<id>.json        the prediction: class, probabilities, confidence, status, mask PNG

`Inbox.add` never raises: it answers an `AddResult` (stored, or refused because the inbox is
full by count or bytes, unwritable, a disk error or an unusable answer) and counts the outcome
(`counters`: stored, refused_full, errors). Files are written to a temporary name, fsynced and
renamed into place while holding the index's write lock, then the row is inserted in the same
transaction: a row never names a missing file. A crash in between leaves at most a temporary
file or a file no row names; `cleanup` (run when an inbox is first opened) removes both.

Retention: when `max_items` pending items or `max_bytes` of pending files would be exceeded,
new items are refused (and counted); nothing pending is ever deleted to make room.

`Inbox.review` writes a reviewed item into an MVTec-layout dataset (`incoming`), exactly as
`defectflow.data.mvtec.scan_dataset` reads it:

    good      -> incoming/train/good/inbox-<id>.<ext>
    <defect>  -> incoming/test/<defect>/inbox-<id>.<ext>
                 incoming/ground_truth/<defect>/inbox-<id>_mask.png   (255 = defect)

and appends a provenance line (who, when, the original prediction, model, inbox id) to
`incoming/provenance.jsonl`. Then the item is marked reviewed and its inbox files are removed.

No HTTP here: service.py and `defectflow.serving.web.review` serve it, `defectflow review` (cli.py)
runs it in a terminal. This module is in the Bento: it must not import defectflow.data.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import queue
import re
import sqlite3
import threading
import time as _time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from defectflow.files import TMP_PREFIX, atomic_write, fsync_dir, write_temp
from defectflow.inference.postprocessing import UNKNOWN_DEFECT

log = logging.getLogger("defectflow.serving.inbox")

INDEX_FILE = "index.sqlite3"
#: The largest mask upload read (a mask is 1 bit of information per pixel: PNG compresses it well).
MAX_MASK_BYTES = 20_000_000
ITEMS_DIR = "items"
PROVENANCE_FILE = "provenance.jsonl"
#: Seconds a temporary file may live before `cleanup` takes it for a crashed write's leftover
#: (a live writer in another process may be between writing and renaming it).
TEMP_MAX_AGE_S = 300.0
BUSY_TIMEOUT_MS = 30_000
_EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "bmp": ".bmp", "tiff": ".tiff"}
#: A class name that is safe as one folder name.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")
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


class InboxError(Exception):
    """A review operation that cannot be done; `status` is the HTTP status it maps to."""

    status = 500

    def __init__(self, message: str = "", status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:  # else the class's own
            self.status = status


class ItemNotFound(InboxError):
    status = 404


class ItemNotPending(InboxError):
    status = 409


class InvalidReview(InboxError):
    status = 400


@dataclass(frozen=True)
class AddResult:
    stored: bool
    #: The item id when stored.
    id: str | None = None
    #: Why not: full_items | full_bytes | unwritable | disk_error | invalid.
    reason: str | None = None
    message: str = ""


@dataclass(frozen=True)
class ReviewResult:
    id: str
    label: str
    #: Paths relative to the incoming dataset folder.
    image: str
    mask: str | None
    incoming: str


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


def _png_bytes(image: np.ndarray) -> bytes:
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
    return _png_bytes(array), "png"


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


def _decode_mask(data: bytes) -> np.ndarray:
    import cv2

    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise InvalidReview("the mask is not a decodable PNG")
    return mask


def _checked_mask_size(data: bytes, width: int, height: int) -> tuple[int, int]:
    """(width, height) of an uploaded mask from its header, after the checks every upload to
    /predict passes (`defectflow.serving.uploads`: sniffed format, PNG chunk lengths, pixel limit), so
    nothing a hostile mask declares is allocated. It must be a PNG of at most the image's pixels
    (it must have exactly its size anyway); else InvalidReview with the upload check's status."""
    from defectflow.serving.uploads import UploadLimits, UploadRejected, check_upload

    limits = UploadLimits(
        max_bytes=MAX_MASK_BYTES, max_pixels=max(1, width * height), allowed_formats=("png",)
    )
    try:
        checked = check_upload(data, limits)
    except UploadRejected as exc:
        raise InvalidReview(
            f"the mask must be a PNG file at the image's size, {width}x{height} (255 or any "
            f"non-zero value = defect): {exc}",
            status=exc.status_code,
        ) from exc
    return checked.width, checked.height


class Inbox:
    """Images and predictions waiting for review; safe to use from threads and processes."""

    def __init__(
        self,
        root: str | Path,
        max_items: int = 10_000,
        max_bytes: int = 2_000_000_000,
        incoming: str | Path | None = None,
    ) -> None:
        self.root = Path(root)
        self.items_dir = self.root / ITEMS_DIR
        self.index_path = self.root / INDEX_FILE
        self.max_items = int(max_items)
        self.max_bytes = int(max_bytes)
        #: The MVTec-layout dataset reviewed items are written into.
        self.incoming = (
            Path(incoming) if incoming is not None else self.root.parent / "data" / "incoming"
        )
        self._counters = _Counters()
        self._opened = False
        self._open_lock = threading.Lock()

    # ------------------------------------------------------------------ storage

    @property
    def counters(self) -> dict[str, int]:
        return self._counters.as_dict()

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
            finally:
                conn.close()
            self._opened = True
        try:
            self.cleanup()
        except (OSError, sqlite3.Error) as exc:
            log.warning("inbox %s: cleanup failed: %s", self.root, exc)

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
        item files no index row names. Returns the names removed."""
        removed = []
        now = _time.time()
        with self._write_transaction() as conn:  # no writer renames a file meanwhile
            named = set()
            for row in conn.execute(
                "SELECT image_file, record_file FROM items WHERE state = 'pending'"
            ):
                named.update(n for n in (row["image_file"], row["record_file"]) if n)
            for path in self.items_dir.iterdir():
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
        if removed:
            log.warning(
                "inbox %s: removed %d leftover file(s) of interrupted writes",
                self.root,
                len(removed),
            )
        return removed

    def _insert(self, conn: sqlite3.Connection, row: dict) -> None:
        conn.execute(
            "INSERT INTO items (id, created, model, predicted_class, confidence, prediction_status, state, "
            "image_file, record_file, bytes) VALUES (:id, :created, :model, :predicted_class, :confidence, "
            ":prediction_status, 'pending', :image_file, :record_file, :bytes)",
            row,
        )

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
        if size > self.max_bytes or self.max_items < 1:
            return self._refuse_full("full_bytes" if size > self.max_bytes else "full_items")
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
                count, used = conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM items WHERE state = 'pending'"
                ).fetchone()
                if count + 1 > self.max_items or used + size > self.max_bytes:
                    reason = "full_items" if count + 1 > self.max_items else "full_bytes"
                    raise _Full(reason)
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
        except _Full as full:
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

    def _refuse_full(self, reason: str) -> AddResult:
        self._counters.bump("refused_full")
        limit = f"{self.max_items} items" if reason == "full_items" else f"{self.max_bytes} bytes"
        return AddResult(
            False, reason=reason, message=f"the inbox is full ({limit}): review or discard items"
        )

    @staticmethod
    def _discard_files(*paths: Path | None) -> None:
        for path in paths:
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ reading

    def _row(self, conn: sqlite3.Connection, item_id: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM items WHERE id = ?", (str(item_id),)).fetchone()
        if row is None:
            raise ItemNotFound(f"no inbox item {item_id!r}")
        return row

    def _opened_or_error(self) -> None:
        try:
            self._open()
        except (OSError, sqlite3.Error) as exc:
            raise InboxError(f"cannot open the inbox at {self.root}: {exc}") from exc

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
            "reviewed_at": row["reviewed_at"],
            "written": json.loads(row["written"]) if row["written"] else None,
        }

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
            return [self._summary(r) for r in conn.execute(query, params)]
        finally:
            conn.close()

    def stats(self) -> dict:
        """Pending items and bytes, with the limits and this instance's counters."""
        self._opened_or_error()
        conn = self._connect()
        try:
            count, used = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM items WHERE state = 'pending'"
            ).fetchone()
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
        finally:
            conn.close()
        item = self._summary(row)
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

    def view(self, item_id: str) -> dict:
        """`get`, with the image, the predicted mask and the mask over the image as base64 PNG
        (what a browser shows; the stored image may be a TIFF)."""
        import cv2

        from defectflow.inference.postprocessing import encode_png, overlay
        from defectflow.inference.preprocessing import InvalidImageError, decode_image

        item = self.get(item_id)
        data = item.pop("image_bytes", None)
        if data is None:
            return item
        try:
            rgb = decode_image(data)
        except InvalidImageError as exc:
            raise InboxError(f"inbox item {item_id}: its image does not decode: {exc}") from exc
        mask = _decode_mask(base64.b64decode(item["prediction"]["mask_png_base64"])) > 0
        if mask.shape != rgb.shape[:2]:
            mask = cv2.resize(
                mask.astype(np.uint8), (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST
            ).astype(bool)
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        item["image_png_base64"] = encode_png(bgr)
        item["overlay_png_base64"] = encode_png(
            cv2.cvtColor(overlay(rgb, mask, (255, 0, 0), 0.5), cv2.COLOR_RGB2BGR)
        )
        item["image_size"] = [int(rgb.shape[1]), int(rgb.shape[0])]
        return item

    # ------------------------------------------------------------------ review

    def review(
        self, item_id: str, label: str, mask: str | bytes = "keep", reviewer: str | None = None
    ) -> ReviewResult:
        """Write a pending item into the incoming dataset as `label`, with provenance.

        `mask`: "keep" (the predicted mask), "clear" (none) or PNG bytes at the image's size
        (non-zero = defect). A defect label needs a non-empty mask; a `good` label takes none.
        Raises ItemNotFound, ItemNotPending, InvalidReview (the item stays pending) or InboxError.
        """
        reviewer = (reviewer or "").strip()
        if not reviewer or len(reviewer) > 200 or any(ord(c) < 32 for c in reviewer):
            raise InvalidReview("give the reviewer's name (1 to 200 printable characters)")
        if not isinstance(mask, (bytes, bytearray)) and mask not in ("keep", "clear"):
            raise InvalidReview(f"mask must be 'keep', 'clear' or a PNG file, got {mask!r}")
        self._opened_or_error()
        written: list[Path] = []
        try:
            with self._write_transaction() as conn:
                row = self._row(conn, item_id)
                if row["state"] != "pending":
                    raise ItemNotPending(
                        f"inbox item {item_id} is already {row['state']}"
                        + (f" (as {row['label']!r} by {row['reviewer']})" if row["label"] else "")
                    )
                record = json.loads((self.items_dir / row["record_file"]).read_text())
                data = (self.items_dir / row["image_file"]).read_bytes()
                classes = list(record["classes"])
                good = classes[0]
                if label not in classes:
                    raise InvalidReview(
                        f"label {label!r} is not a class of model {record['model']}: "
                        f"expected one of {', '.join(classes)}"
                    )
                if not _SAFE_NAME.match(label):
                    raise InvalidReview(f"label {label!r} cannot be a dataset folder name")
                stem = f"inbox-{row['id']}"
                image_rel = (
                    Path("train") / good if label == good else Path("test") / label
                ) / f"{stem}{Path(row['image_file']).suffix}"
                mask_rel = None
                mask_png = None
                if label != good:
                    mask_png, source = self._defect_mask(record, data, mask, label)
                    mask_rel = Path("ground_truth") / label / f"{stem}_mask.png"
                else:
                    source = "none"
                # The mask first: the dataset never holds a defect image without its mask.
                if mask_rel is not None:
                    atomic_write(self.incoming / mask_rel, mask_png)
                    written.append(self.incoming / mask_rel)
                atomic_write(self.incoming / image_rel, data)
                written.append(self.incoming / image_rel)
                now = _time.time()
                self._append_provenance(
                    {
                        "inbox_id": row["id"],
                        "image": str(image_rel),
                        "mask": str(mask_rel) if mask_rel else None,
                        "label": label,
                        "mask_source": source,
                        "reviewer": reviewer,
                        "reviewed_at": now,
                        "reviewed_at_iso": _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime(now)),
                        "predicted_class": record["class"],
                        "probabilities": record["probabilities"],
                        "confidence": record["confidence"],
                        "prediction_status": record["status"],
                        "model": record["model"],
                        "predicted_at": record["time"],
                        "request_id": record.get("request_id"),
                    }
                )
                where = {
                    "image": str(image_rel),
                    "mask": str(mask_rel) if mask_rel else None,
                    "incoming": str(self.incoming),
                }
                conn.execute(
                    "UPDATE items SET state = 'reviewed', label = ?, reviewer = ?, reviewed_at = ?, "
                    "written = ?, image_file = NULL, record_file = NULL, bytes = 0 WHERE id = ?",
                    (label, reviewer, now, json.dumps(where), row["id"]),
                )
        except InboxError:
            self._discard_files(*written)
            raise
        except (OSError, sqlite3.Error, ValueError, KeyError) as exc:
            self._discard_files(*written)
            raise InboxError(
                f"inbox item {item_id}: the review could not be written ({type(exc).__name__}: "
                f"{exc}); the item is still pending"
            ) from exc
        self._discard_files(self.items_dir / row["image_file"], self.items_dir / row["record_file"])
        return ReviewResult(
            row["id"],
            label,
            str(image_rel),
            str(mask_rel) if mask_rel else None,
            str(self.incoming),
        )

    def _defect_mask(
        self, record: dict, image_data: bytes, mask: str | bytes, label: str
    ) -> tuple[bytes, str]:
        """The PNG mask (0 / 255 at the image's size) for a defect label, or InvalidReview."""
        need = (
            f"a {label!r} image needs a defect mask (the dataset pairs every defect image with one): "
            "upload a PNG mask"
        )
        if mask == "clear":
            raise InvalidReview(f"{need} instead of clearing it")
        width, height = self._image_size(record, image_data)
        if mask == "keep":
            pixels = _decode_mask(base64.b64decode(record["mask_png_base64"]))
            source = "prediction"
            if not pixels.any():
                raise InvalidReview(
                    f"{need}: the predicted mask is empty (the model answered {record['class']!r})"
                )
        else:
            mask_w, mask_h = _checked_mask_size(bytes(mask), width, height)
            if (mask_w, mask_h) != (width, height):
                raise InvalidReview(
                    f"the mask is {mask_w}x{mask_h} pixels, the image {width}x{height}: "
                    "they must match"
                )
            pixels = _decode_mask(bytes(mask))
            source = "upload"
            if not pixels.any():
                raise InvalidReview(f"{need}: the uploaded mask is empty (all zero)")
        if pixels.shape != (height, width):
            raise InvalidReview(
                f"the mask is {pixels.shape[1]}x{pixels.shape[0]} pixels, the image "
                f"{width}x{height}: they must match"
            )
        return _png_bytes(np.where(pixels > 0, 255, 0).astype(np.uint8)), source

    @staticmethod
    def _image_size(record: dict, image_data: bytes) -> tuple[int, int]:
        size = record.get("mask_size")
        if isinstance(size, list) and len(size) == 2:
            return int(size[0]), int(size[1])
        from defectflow.inference.preprocessing import decode_image

        rgb = decode_image(image_data)
        return int(rgb.shape[1]), int(rgb.shape[0])

    def _append_provenance(self, entry: dict) -> None:
        """One JSON line, appended with one write under an exclusive lock, then fsynced."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode("utf-8")
        fd = os.open(self.incoming / PROVENANCE_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.write(fd, line) != len(line):
                raise OSError(f"short write to {self.incoming / PROVENANCE_FILE}")
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self, item_id: str) -> None:
        """Drop a pending item (not an inspection image worth keeping); its files go."""
        self._opened_or_error()
        with self._write_transaction() as conn:
            row = self._row(conn, item_id)
            if row["state"] != "pending":
                raise ItemNotPending(f"inbox item {item_id} is already {row['state']}")
            conn.execute(
                "UPDATE items SET state = 'discarded', reviewed_at = ?, image_file = NULL, "
                "record_file = NULL, bytes = 0 WHERE id = ?",
                (_time.time(), row["id"]),
            )
        self._discard_files(self.items_dir / row["image_file"], self.items_dir / row["record_file"])


def read_provenance(incoming: str | Path) -> list[dict]:
    """The provenance lines of an incoming dataset (a line cut short by a crash is skipped)."""
    path = Path(incoming) / PROVENANCE_FILE
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return entries


class _Full(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InboxWriter:
    """Adds items from a background thread, so a prediction never waits for a disk.

    `submit` only queues (bounded by count and bytes); when the queue is full the item is
    refused and counted (`refused_busy`). `on_result` is called with each AddResult."""

    def __init__(
        self,
        inbox: Inbox,
        max_queue: int = 32,
        max_queue_bytes: int = 256_000_000,
        on_result: Callable[[AddResult], None] | None = None,
    ) -> None:
        self.inbox = inbox
        self.max_queue = int(max_queue)
        self.max_queue_bytes = int(max_queue_bytes)
        self.on_result = on_result
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._queued_bytes = 0
        self._queued = 0
        self.refused_busy = 0
        self.callback_errors = 0
        self._thread = threading.Thread(target=self._run, name="defectflow-inbox", daemon=True)
        self._thread.start()

    def submit(
        self, image: bytes | np.ndarray, answer: dict, model_tag: str, time: float | None = None
    ) -> bool:
        size = (
            len(image) if isinstance(image, (bytes, bytearray)) else int(np.asarray(image).nbytes)
        )
        with self._lock:
            if self._queued >= self.max_queue or self._queued_bytes + size > self.max_queue_bytes:
                self.refused_busy += 1
                return False
            self._queued += 1
            self._queued_bytes += size
        self._queue.put(
            (image, answer, model_tag, time if time is not None else _time.time(), size)
        )
        return True

    def _run(self) -> None:
        while True:
            image, answer, model_tag, created, size = self._queue.get()
            try:
                result = self.inbox.add(image, answer, model_tag, created)
                if self.on_result is not None:
                    self.on_result(result)
            except Exception:  # noqa: BLE001 - the thread must keep going
                self.callback_errors += 1
                log.exception("inbox writer: an item's result could not be handled")
            finally:
                with self._lock:
                    self._queued -= 1
                    self._queued_bytes -= size
                self._queue.task_done()

    def join(self, timeout: float = 30.0) -> bool:
        """Wait until the queue is empty; False when `timeout` passed first."""
        deadline = _time.monotonic() + timeout
        while _time.monotonic() < deadline:
            with self._lock:
                if self._queued == 0:
                    return True
            _time.sleep(0.01)
        return False

    @property
    def counters(self) -> dict[str, int]:
        return {**self.inbox.counters, "refused_busy": self.refused_busy}


__all__ = [
    "AddResult",
    "Inbox",
    "InboxError",
    "InboxWriter",
    "InvalidReview",
    "ItemNotFound",
    "ItemNotPending",
    "ReviewResult",
    "read_provenance",
]
