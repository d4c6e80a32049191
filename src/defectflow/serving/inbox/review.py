"""Review: `Inbox`, the store plus what a reviewer does with a pending item.

`Inbox.review` is one reviewer's vote on an item: the label must be one of the model's
classes; a defect label needs a non-empty mask at the image's size (the predicted one, or an
uploaded PNG that passes the checks of /predict's uploads before anything decodes it), a `good`
label takes none. The vote is recorded (a reviewer's second vote replaces their first); when
the votes meet the review policy (`trust.ReviewPolicy`: enough distinct reviewers agreeing, or
a trusted one) the item is written into the incoming dataset with its provenance (`export`),
marked reviewed and its inbox files removed; else it stays pending with its votes. `discard`
drops an item (never exported); `view` shows one to a person (image, predicted mask, overlay).
Nothing changes unless the whole vote (and export) succeeds.

No HTTP here: service.py and `defectflow.serving.web.review` serve it, `defectflow review`
(the CLI) runs it in a terminal.
"""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import time as _time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectflow.serving.inbox.errors import InboxError, InvalidReview, ItemNotPending
from defectflow.serving.inbox.export import (
    append_provenance,
    dataset_paths,
    provenance_entry,
    write_into_dataset,
)
from defectflow.serving.inbox.store import InboxStore, png_bytes
from defectflow.serving.inbox.trust import (
    Decision,
    Reviewer,
    ReviewPolicy,
    Vote,
    disputed,
    mask_digest,
    votes_from_rows,
)

#: The largest mask upload read (a mask is 1 bit of information per pixel: PNG compresses it well).
MAX_MASK_BYTES = 20_000_000
#: A class name that is safe as one folder name.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")


@dataclass(frozen=True)
class ReviewResult:
    id: str
    #: The label written (reviewed), or the one this vote gave (pending).
    label: str
    #: Paths relative to the incoming dataset folder; None while the item is pending.
    image: str | None
    mask: str | None
    incoming: str
    #: reviewed (written into the incoming dataset) | pending (the vote is recorded, the
    #: policy is not met yet).
    status: str = "reviewed"
    #: Who cast this vote, and how that is known (`trust.ESTABLISHED`).
    reviewer: str = ""
    identity: str = ""
    #: The item's votes so far (`trust.Vote.as_dict`), oldest first.
    votes: tuple[dict, ...] = ()
    disputed: bool = False
    #: Why it was written: agreement | trusted; None while pending.
    met_by: str | None = None


class Inbox(InboxStore):
    """Images and predictions waiting for review; safe to use from threads and processes.

    Storage (add, list, get, stats, cleanup) is `InboxStore`'s; here: review, discard, view."""

    def __init__(
        self,
        root: str | Path,
        max_items: int = 10_000,
        max_bytes: int = 2_000_000_000,
        incoming: str | Path | None = None,
        policy: ReviewPolicy | None = None,
    ) -> None:
        super().__init__(root, max_items, max_bytes)
        #: The MVTec-layout dataset reviewed items are written into.
        self.incoming = (
            Path(incoming) if incoming is not None else self.root.parent / "data" / "incoming"
        )
        #: When votes are enough to write an item (default: one review, as before votes).
        self.policy = policy or ReviewPolicy()

    def review(
        self,
        item_id: str,
        label: str,
        mask: str | bytes = "keep",
        reviewer: str | Reviewer | None = None,
    ) -> ReviewResult:
        """Record `reviewer`'s vote that a pending item is `label`; write it into the incoming
        dataset, with provenance, once the votes meet the policy.

        `mask`: "keep" (the predicted mask), "clear" (none) or PNG bytes at the image's size
        (non-zero = defect). A defect label needs a non-empty mask; a `good` label takes none.
        `reviewer`: a `trust.Reviewer`, or a name (established "local").
        Raises ItemNotFound, ItemNotPending, InvalidReview (the item stays pending, the vote
        is not recorded) or InboxError.
        """
        reviewer = _checked_reviewer(reviewer)
        if not isinstance(mask, (bytes, bytearray)) and mask not in ("keep", "clear"):
            raise InvalidReview(f"mask must be 'keep', 'clear' or a PNG file, got {mask!r}")
        self._opened_or_error()
        written: list[Path] = []
        try:
            with self._write_transaction() as conn:
                row = self._pending_row(conn, item_id)
                record = json.loads((self.items_dir / row["record_file"]).read_text())
                data = (self.items_dir / row["image_file"]).read_bytes()
                good = _checked_label(label, record)
                mask_png, source = (
                    _defect_mask(record, data, mask, label) if label != good else (None, "none")
                )
                choice = mask_digest(mask_png) if source == "upload" else source
                _record_vote(conn, row["id"], reviewer, label, choice, mask_png)
                votes = votes_from_rows(self._vote_rows(conn, row["id"]))
                decision = self.policy.decide(votes)
                if decision is None:
                    return ReviewResult(
                        row["id"],
                        label,
                        None,
                        None,
                        str(self.incoming),
                        "pending",
                        reviewer.name,
                        reviewer.established,
                        tuple(v.as_dict() for v in votes),
                        disputed(votes),
                    )
                where = self._export(conn, row, record, data, decision, votes, written)
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
            decision.vote.label,
            where["image"],
            where["mask"],
            where["incoming"],
            "reviewed",
            reviewer.name,
            reviewer.established,
            tuple(v.as_dict() for v in votes),
            disputed(votes),
            decision.met_by,
        )

    def _export(
        self,
        conn: sqlite3.Connection,
        row: sqlite3.Row,
        record: dict,
        data: bytes,
        decision: Decision,
        votes: list[Vote],
        written: list[Path],
    ) -> dict:
        """Write the item as the decision says into the incoming dataset, append its provenance
        (with the votes and the policy they met) and mark it reviewed; the paths written."""
        vote = decision.vote
        good = record["classes"][0]
        paths = dataset_paths(row["id"], Path(row["image_file"]).suffix, vote.label, good)
        mask_png = _decided_mask(conn, row["id"], record, data, vote)
        write_into_dataset(self.incoming, paths, data, mask_png, written)
        now = _time.time()
        source = vote.mask.split(":", 1)[0]
        append_provenance(
            self.incoming,
            provenance_entry(
                row["id"],
                paths,
                vote.label,
                source,
                vote.reviewer,
                now,
                record,
                trust={
                    "identity": vote.established,
                    "mask_choice": vote.mask,
                    "votes": [v.as_dict() for v in votes],
                    "policy": self.policy.as_dict(),
                    "met_by": decision.met_by,
                },
            ),
        )
        where = {
            "image": str(paths.image),
            "mask": str(paths.mask) if paths.mask else None,
            "incoming": str(self.incoming),
        }
        conn.execute(
            "UPDATE items SET state = 'reviewed', label = ?, reviewer = ?, reviewer_identity = ?, "
            "reviewed_at = ?, written = ?, image_file = NULL, record_file = NULL, bytes = 0 "
            "WHERE id = ?",
            (vote.label, vote.reviewer, vote.established, now, json.dumps(where), row["id"]),
        )
        return where

    def _pending_row(self, conn: sqlite3.Connection, item_id: str) -> sqlite3.Row:
        row = self._row(conn, item_id)
        if row["state"] != "pending":
            raise ItemNotPending(
                f"inbox item {item_id} is already {row['state']}"
                + (f" (as {row['label']!r} by {row['reviewer']})" if row["label"] else "")
            )
        return row

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


def _checked_reviewer(reviewer: str | Reviewer | None) -> Reviewer:
    """A `Reviewer` with a usable name (a bare name: established "local"); else InvalidReview."""
    if not isinstance(reviewer, Reviewer):
        reviewer = Reviewer(reviewer or "")
    name = reviewer.name.strip()
    if not name or len(name) > 200 or any(ord(c) < 32 for c in name):
        raise InvalidReview("give the reviewer's name (1 to 200 printable characters)")
    return Reviewer(name, reviewer.established)


def _record_vote(
    conn: sqlite3.Connection,
    item_id: str,
    reviewer: Reviewer,
    label: str,
    choice: str,
    mask_png: bytes | None,
) -> None:
    """One vote per item and reviewer: a second one replaces the first."""
    conn.execute(
        "INSERT INTO votes (item_id, reviewer, identity, label, mask_choice, mask_png, voted_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (item_id, reviewer) DO UPDATE SET "
        "identity = excluded.identity, label = excluded.label, mask_choice = excluded.mask_choice, "
        "mask_png = excluded.mask_png, voted_at = excluded.voted_at",
        (
            item_id,
            reviewer.name,
            reviewer.established,
            label,
            choice,
            mask_png if choice.startswith("upload:") else None,
            _time.time(),
        ),
    )


def _decided_mask(
    conn: sqlite3.Connection, item_id: str, record: dict, data: bytes, vote: Vote
) -> bytes | None:
    """The mask PNG the winning vote chose: none, the predicted one, or its upload (kept with
    the vote)."""
    if vote.mask == "none":
        return None
    if vote.mask == "prediction":
        return _defect_mask(record, data, "keep", vote.label)[0]
    (blob,) = conn.execute(
        "SELECT mask_png FROM votes WHERE item_id = ? AND reviewer = ?", (item_id, vote.reviewer)
    ).fetchone()
    return bytes(blob)


def _checked_label(label: str, record: dict) -> str:
    """The good class (the model's first) after checking `label` is one of the model's classes
    and usable as a folder name; else InvalidReview."""
    classes = list(record["classes"])
    if label not in classes:
        raise InvalidReview(
            f"label {label!r} is not a class of model {record['model']}: "
            f"expected one of {', '.join(classes)}"
        )
    if not _SAFE_NAME.match(label):
        raise InvalidReview(f"label {label!r} cannot be a dataset folder name")
    return classes[0]


# ---------------------------------------------------------------------- masks


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


def _defect_mask(
    record: dict, image_data: bytes, mask: str | bytes, label: str
) -> tuple[bytes, str]:
    """The PNG mask (0 / 255 at the image's size) for a defect label and where it came from
    (prediction | upload), or InvalidReview."""
    need = (
        f"a {label!r} image needs a defect mask (the dataset pairs every defect image with one): "
        "upload a PNG mask"
    )
    if mask == "clear":
        raise InvalidReview(f"{need} instead of clearing it")
    width, height = _image_size(record, image_data)
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
                f"the mask is {mask_w}x{mask_h} pixels, the image {width}x{height}: they must match"
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
    return png_bytes(np.where(pixels > 0, 255, 0).astype(np.uint8)), source


def _image_size(record: dict, image_data: bytes) -> tuple[int, int]:
    size = record.get("mask_size")
    if isinstance(size, list) and len(size) == 2:
        return int(size[0]), int(size[1])
    from defectflow.inference.preprocessing import decode_image

    rgb = decode_image(image_data)
    return int(rgb.shape[1]), int(rgb.shape[0])
