"""The review inbox (defectflow.serving.inbox): atomic storage, retention, concurrency, review into an
MVTec-layout dataset that defectflow.data.mvtec reads back, and `defectflow review`."""

from __future__ import annotations

import base64
import io
import json
import os
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers_inbox import CLASSES, answer
from helpers_inbox import image as _image
from helpers_inbox import png as _png
from PIL import Image

from defectflow.data.mvtec import scan_dataset
from defectflow.inference.preprocessing import read_mask
from defectflow.serving.inbox import (
    ITEMS_DIR,
    Inbox,
    InboxError,
    InboxWriter,
    InvalidReview,
    ItemNotFound,
    ItemNotPending,
    read_provenance,
)

MODEL = "defectflow:test1"


def _answer(label: str = "crack", h: int = 40, w: int = 56, mask=None) -> dict:
    return answer(label, h, w, mask, model=MODEL)


def _rows(inbox: Inbox) -> list[sqlite3.Row]:
    conn = sqlite3.connect(inbox.index_path)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM items").fetchall()
    finally:
        conn.close()


def _check_consistent(inbox: Inbox) -> list[sqlite3.Row]:
    """Every pending row names files that exist and decode; no file without a row; no temp file."""
    rows = [r for r in _rows(inbox) if r["state"] == "pending"]
    files = sorted(p.name for p in (inbox.root / ITEMS_DIR).iterdir())
    assert files == sorted([r["image_file"] for r in rows] + [r["record_file"] for r in rows])
    for row in rows:
        image = cv2.imdecode(
            np.fromfile(inbox.root / ITEMS_DIR / row["image_file"], np.uint8), cv2.IMREAD_UNCHANGED
        )
        assert image is not None, row["image_file"]
        record = json.loads((inbox.root / ITEMS_DIR / row["record_file"]).read_text())
        assert record["id"] == row["id"] and record["class"] == row["predicted_class"]
        assert row["bytes"] == sum(
            (inbox.root / ITEMS_DIR / n).stat().st_size
            for n in (row["image_file"], row["record_file"])
        )
    return rows


def test_add_keeps_the_upload_as_sent_and_the_prediction(tmp_path):
    inbox = Inbox(tmp_path / "inbox", incoming=tmp_path / "incoming")
    jpeg = cv2.imencode(".jpg", _image(0))[1].tobytes()
    stored = inbox.add(jpeg, _answer("crack"), MODEL, time=1_700_000_000.0)
    from_array = inbox.add(_image(1), _answer("good"), MODEL)
    assert stored.stored and from_array.stored, (stored, from_array)
    item = inbox.get(stored.id)
    assert item["image_bytes"] == jpeg  # the bytes as uploaded
    assert (
        item["status"] == "pending" and item["time"] == 1_700_000_000.0 and item["model"] == MODEL
    )
    assert item["prediction"]["class"] == "crack" and item["prediction"]["confidence"] == 0.6
    assert item["prediction"]["status"] == "uncertain" and item["prediction"]["classes"] == CLASSES
    array_item = inbox.get(from_array.id)
    assert np.array_equal(
        cv2.imdecode(np.frombuffer(array_item["image_bytes"], np.uint8), cv2.IMREAD_COLOR),
        _image(1)[:, :, ::-1],
    )  # an RGB array is stored as a lossless PNG
    assert [i["id"] for i in inbox.list()] == [stored.id, from_array.id]  # oldest first
    assert inbox.counters == {"stored": 2, "refused_full": 0, "errors": 0}
    _check_consistent(inbox)
    view = inbox.view(stored.id)
    overlay = cv2.imdecode(
        np.frombuffer(base64.b64decode(view["overlay_png_base64"]), np.uint8), cv2.IMREAD_COLOR
    )
    assert overlay.shape == (40, 56, 3) and view["image_size"] == [56, 40]


def test_bad_input_is_refused_and_counted_never_raised(tmp_path):
    inbox = Inbox(tmp_path / "inbox")
    assert inbox.add(b"not an image", _answer(), MODEL).reason == "invalid"
    assert inbox.add(_image(0), {"class": "crack"}, MODEL).reason == "invalid"
    assert inbox.add(np.zeros((4, 4, 3), np.float32), _answer(), MODEL).reason == "invalid"
    assert inbox.counters == {"stored": 0, "refused_full": 0, "errors": 3}


def test_a_failed_index_insert_leaves_no_row_and_no_file(tmp_path, monkeypatch):
    inbox = Inbox(tmp_path / "inbox")
    kept = inbox.add(_image(0), _answer(), MODEL)
    assert kept.stored

    def crash(self, conn, row):  # the files are written and renamed when the insert fails
        assert (self.root / ITEMS_DIR / row["image_file"]).exists()
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(Inbox, "_insert", crash)
    result = inbox.add(_image(1), _answer(), MODEL)
    assert (
        not result.stored and result.reason == "disk_error" and "disk I/O error" in result.message
    )
    assert inbox.counters["errors"] == 1
    rows = _check_consistent(inbox)  # no dangling row, no half-written or orphan file
    assert [r["id"] for r in rows] == [kept.id]


def test_a_crash_between_file_and_row_leaves_only_leftovers_that_cleanup_removes(tmp_path):
    inbox = Inbox(tmp_path / "inbox")
    kept = inbox.add(_image(0), _answer(), MODEL)
    items = tmp_path / "inbox" / ITEMS_DIR
    # What a killed writer leaves: a temporary file (written, not renamed), or a renamed file
    # whose row was never committed.
    temp = items / ".tmp-0123456789abcdef"
    temp.write_bytes(b"\x89PNG half")
    old = time.time() - 3600
    os.utime(temp, (old, old))
    fresh_temp = items / ".tmp-fedcba9876543210"  # maybe a live writer of another process
    fresh_temp.write_bytes(b"\x89PNG")
    (items / "20250101T000000-deadbeef0000.png").write_bytes(_png(_image(2)))
    reopened = Inbox(tmp_path / "inbox")
    assert len(reopened.list()) == 1  # opening runs cleanup
    assert sorted(p.name for p in items.iterdir()) == sorted(
        [fresh_temp.name, *(r[k] for r in _rows(inbox) for k in ("image_file", "record_file"))]
    )
    assert reopened.cleanup(temp_max_age_s=0) == [fresh_temp.name]
    _check_consistent(reopened)
    assert reopened.get(kept.id)["status"] == "pending"


def test_an_unwritable_inbox_refuses_and_counts_without_raising(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the inbox folder should be")
    inbox = Inbox(blocker / "inbox")  # mkdir fails with NotADirectoryError, even as root
    result = inbox.add(_image(0), _answer(), MODEL)
    assert (
        not result.stored
        and result.reason == "unwritable"
        and "NotADirectoryError" in result.message
    )
    assert inbox.counters == {"stored": 0, "refused_full": 0, "errors": 1}
    # Behind the service's background writer: the prediction path only queues, and goes on.
    outcomes = []
    writer = InboxWriter(inbox, on_result=outcomes.append)
    assert writer.submit(_png(_image(1)), _answer(), MODEL) is True
    assert writer.join(10)
    assert [o.reason for o in outcomes] == ["unwritable"] and writer.counters["errors"] == 2
    with pytest.raises(InboxError, match="cannot open the inbox"):
        inbox.list()


@pytest.mark.parametrize("limit", ["items", "bytes"])
def test_retention_refuses_new_items_and_keeps_pending_ones(tmp_path, limit):
    probe = Inbox(tmp_path / "probe").add(_image(0), _answer(), MODEL)
    one = _rows(Inbox(tmp_path / "probe"))[0]["bytes"]
    assert probe.stored
    caps = (
        {"max_items": 3, "max_bytes": 10**9}
        if limit == "items"
        else {"max_items": 100, "max_bytes": 3 * one + 10}
    )
    inbox = Inbox(tmp_path / "inbox", **caps)
    results = [inbox.add(_image(0), _answer(), MODEL) for _ in range(5)]
    assert [r.stored for r in results] == [True, True, True, False, False]
    assert {r.reason for r in results[3:]} == {f"full_{limit}"} and "inbox is full" in results[
        3
    ].message
    assert inbox.counters == {"stored": 3, "refused_full": 2, "errors": 0}
    assert [i["id"] for i in inbox.list()] == [r.id for r in results[:3]]  # nothing pending deleted
    _check_consistent(inbox)
    inbox.discard(results[0].id)  # room again
    assert inbox.add(_image(0), _answer(), MODEL).stored


_WRITER = """
import json, sys, threading, time
import cv2, numpy as np
from pathlib import Path
sys.path[:0] = [sys.argv[4], str(Path(sys.argv[4]).parent)]  # the test module and the helpers
from test_inbox import _answer, _image, MODEL
from defectflow.serving.inbox import Inbox
process = int(sys.argv[3])
inbox = Inbox(sys.argv[1], max_items=int(sys.argv[2]))
inbox.list()  # opened (and its cleanup done) before the rendezvous
go = threading.Barrier(9)  # the 8 writers and the main thread, released by the parent's "go"
results = {}
def write(i):
    seed = 8 * process + i
    image = _image(seed)
    data = cv2.imencode(".png", image[:, :, ::-1])[1].tobytes() if i % 2 else image  # bytes: as a camera sends
    answer = {**_answer(), "request_id": f"p{process}-{i}"}
    go.wait()
    start = time.time()
    result = inbox.add(data, answer, MODEL)
    results[answer["request_id"]] = {"seed": seed, "png": bool(i % 2), "start": start, "end": time.time(),
                                     "stored": result.stored, "id": result.id, "reason": result.reason}
threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
[t.start() for t in threads]
print("ready", flush=True)
assert sys.stdin.readline().strip() == "go"
go.wait()
[t.join() for t in threads]
print(json.dumps({"counters": inbox.counters, "results": results}))
"""


def test_32_concurrent_writers_in_4_processes_lose_nothing(tmp_path):
    """4 processes x 8 threads, all released at once (a pipe rendezvous across the processes,
    then a thread barrier in each), add 32 items to an inbox that holds 24: exactly 24 are
    stored, each whole and as sent, exactly 8 refused as full, and the index names exactly
    the stored files."""
    root = tmp_path / "inbox"
    Inbox(root).list()  # create the index once
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(root), "24", str(p), str(Path(__file__).parent)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for p in range(4)
    ]
    try:
        for proc in procs:  # every process imported, opened the inbox and started its threads
            assert proc.stdout.readline().strip() == "ready", proc.communicate(timeout=60)
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        start = time.monotonic()
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [0] * 4
    reports = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    counters = [r["counters"] for r in reports]
    results = {k: v for r in reports for k, v in r["results"].items()}
    print(f"\n32 writers released together, done in {time.monotonic() - start:.2f} s: {counters}")
    assert sorted(results) == sorted(f"p{p}-{i}" for p in range(4) for i in range(8))
    # The writes overlapped: every process had started adding before any process finished.
    assert max(
        min(v["start"] for k, v in results.items() if k.startswith(f"p{p}-")) for p in range(4)
    ) < min(max(v["end"] for k, v in results.items() if k.startswith(f"p{p}-")) for p in range(4))
    assert (
        sum(c["stored"] for c in counters) == 24
    )  # max_items, exactly: the check is transactional
    assert sum(c["refused_full"] for c in counters) == 8
    assert sum(c["errors"] for c in counters) == 0
    stored = {k: v for k, v in results.items() if v["stored"]}
    assert len(stored) == 24 and all(
        v["reason"] == "full_items" for v in results.values() if not v["stored"]
    )

    inbox = Inbox(root)
    rows = _check_consistent(inbox)
    assert sorted(r["id"] for r in rows) == sorted(
        v["id"] for v in stored.values()
    )  # one row per stored item
    assert inbox.stats()["pending"] == 24
    for request_id, v in stored.items():
        item = inbox.get(v["id"])
        assert item["prediction"]["request_id"] == request_id and item["model"] == MODEL
        assert (
            item["prediction"]["class"] == "crack" and item["prediction"]["status"] == "uncertain"
        )
        if v["png"]:  # the upload's bytes, as sent
            assert (
                item["image_bytes"]
                == cv2.imencode(".png", _image(v["seed"])[:, :, ::-1])[1].tobytes()
            )
        decoded = cv2.imdecode(np.frombuffer(item["image_bytes"], np.uint8), cv2.IMREAD_COLOR)
        assert np.array_equal(decoded[:, :, ::-1], _image(v["seed"])), (
            request_id
        )  # whole: every pixel


def test_32_concurrent_threads_share_one_inbox(tmp_path):
    inbox = Inbox(tmp_path / "inbox", max_items=1000)
    barrier = threading.Barrier(32)
    results = []

    def write(i):
        barrier.wait()
        results.append(inbox.add(_image(i), _answer(), MODEL))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 32 and all(r.stored for r in results), [
        r for r in results if not r.stored
    ]
    assert inbox.counters["stored"] == 32
    assert len(_check_consistent(inbox)) == 32


def test_review_writes_the_mvtec_layout_that_scan_dataset_reads(tmp_path):
    inbox = Inbox(tmp_path / "inbox", incoming=tmp_path / "incoming")
    kept = inbox.add(_png(_image(0)), _answer("crack"), MODEL)
    corrected = inbox.add(_image(1), _answer("good"), MODEL)  # predicted good, a person sees a poke
    good_with_mask = inbox.add(
        _image(2), _answer("crack"), MODEL
    )  # predicted crack, a person sees good
    jpeg = inbox.add(cv2.imencode(".jpg", _image(3))[1].tobytes(), _answer("poke"), MODEL)
    drawn = np.zeros((40, 56), np.uint8)
    drawn[20:30, 0:8] = 200

    done = inbox.review(kept.id, "crack", "keep", "ann")
    assert (
        done.image == f"test/crack/inbox-{kept.id}.png"
        and done.mask == f"ground_truth/crack/inbox-{kept.id}_mask.png"
    )
    inbox.review(corrected.id, "poke", _png(drawn), "bob")
    good = inbox.review(good_with_mask.id, "good", "keep", "ann")
    assert (
        good.image == f"train/good/inbox-{good_with_mask.id}.png" and good.mask is None
    )  # mask ignored
    inbox.review(jpeg.id, "poke", "keep", "ann")

    samples = {s.path.stem: s for s in scan_dataset(tmp_path / "incoming")}
    assert {k: (s.label, s.origin) for k, s in samples.items()} == {
        f"inbox-{kept.id}": ("crack", "test"),
        f"inbox-{corrected.id}": ("poke", "test"),
        f"inbox-{good_with_mask.id}": ("good", "train"),
        f"inbox-{jpeg.id}": ("poke", "test"),
    }
    assert samples[f"inbox-{good_with_mask.id}"].mask_path is None
    assert not (tmp_path / "incoming" / "ground_truth" / "good").exists()
    expected_kept = np.zeros((40, 56), np.uint8)
    expected_kept[5:15, 10:30] = 1
    assert np.array_equal(read_mask(samples[f"inbox-{kept.id}"].mask_path), expected_kept)
    assert np.array_equal(
        read_mask(samples[f"inbox-{corrected.id}"].mask_path), (drawn > 0).astype(np.uint8)
    )
    assert samples[f"inbox-{jpeg.id}"].path.suffix == ".jpg"
    assert samples[f"inbox-{kept.id}"].path.read_bytes() == _png(_image(0))  # the image as uploaded

    provenance = {p["inbox_id"]: p for p in read_provenance(tmp_path / "incoming")}
    assert set(provenance) == {kept.id, corrected.id, good_with_mask.id, jpeg.id}
    entry = provenance[corrected.id]
    assert (
        entry["reviewer"] == "bob"
        and entry["label"] == "poke"
        and entry["predicted_class"] == "good"
    )
    assert (
        entry["model"] == MODEL
        and entry["confidence"] == 0.6
        and entry["prediction_status"] == "uncertain"
    )
    assert (
        entry["mask_source"] == "upload" and entry["image"] == f"test/poke/inbox-{corrected.id}.png"
    )
    assert entry["probabilities"] == _answer("good")["probabilities"] and entry["reviewed_at"] > 0

    assert inbox.list() == []
    reviewed = inbox.list("reviewed")
    assert {r["id"]: r["label"] for r in reviewed} == {
        kept.id: "crack",
        corrected.id: "poke",
        good_with_mask.id: "good",
        jpeg.id: "poke",
    }
    assert list((tmp_path / "inbox" / ITEMS_DIR).iterdir()) == []  # the inbox copy is released
    with pytest.raises(ItemNotPending, match="already reviewed"):
        inbox.review(kept.id, "crack", "keep", "ann")


def test_an_invalid_review_says_why_and_leaves_the_item_pending(tmp_path):
    inbox = Inbox(tmp_path / "inbox", incoming=tmp_path / "incoming")
    defect = inbox.add(_image(0), _answer("crack"), MODEL)
    was_good = inbox.add(_image(1), _answer("good"), MODEL)
    cases = [
        (
            defect.id,
            "scratch",
            "keep",
            "ann",
            r"label 'scratch' is not a class of model defectflow:test1: "
            r"expected one of good, crack, poke",
        ),
        (defect.id, "crack", "clear", "ann", "needs a defect mask"),
        (was_good.id, "crack", "keep", "ann", "the predicted mask is empty"),
        (
            defect.id,
            "crack",
            _png(np.zeros((40, 56), np.uint8)),
            "ann",
            "the uploaded mask is empty",
        ),
        (
            defect.id,
            "crack",
            _png(np.full((10, 10), 255, np.uint8)),
            "ann",
            "the mask is 10x10 pixels, the image 56x40",
        ),
        (defect.id, "crack", b"GIF89a not a png", "ann", "must be a PNG"),
        (defect.id, "crack", "keep", " ", "reviewer"),
        (defect.id, "crack", "bogus", "ann", "mask must be 'keep', 'clear' or a PNG"),
    ]
    for item_id, label, mask, reviewer, message in cases:
        with pytest.raises(InvalidReview, match=message):
            inbox.review(item_id, label, mask, reviewer)
    assert {i["id"] for i in inbox.list()} == {defect.id, was_good.id}
    assert not (tmp_path / "incoming").exists() or not any(
        p.is_file() for p in (tmp_path / "incoming").rglob("*")
    )
    _check_consistent(inbox)
    with pytest.raises(ItemNotFound, match="no inbox item 'nope'"):
        inbox.review("nope", "crack", "keep", "ann")
    inbox.discard(was_good.id)
    with pytest.raises(ItemNotPending, match="already discarded"):
        inbox.review(was_good.id, "good", "keep", "ann")
    with pytest.raises(ItemNotPending):
        inbox.discard(was_good.id)
    assert inbox.review(defect.id, "crack", "keep", "ann").mask  # still reviewable


def _lying_chunk_length(png: bytes) -> bytes:
    """The PNG with its IDAT chunk claiming ~4 GB: OpenCV would allocate that before reading."""
    data = bytearray(png)
    idat = data.find(b"IDAT") - 4
    data[idat : idat + 4] = struct.pack(">I", 0xFF0004D9)
    return bytes(data)


def test_a_hostile_mask_upload_is_refused_from_its_header_and_the_item_stays(tmp_path, monkeypatch):
    """Mask uploads pass the checks of /predict (defectflow.serving.uploads) before anything decodes them."""
    from helpers_uploads import png_with_size, rgb_image

    from defectflow.serving.inbox import review as inbox_module  # where the review decodes masks

    inbox = Inbox(tmp_path / "inbox", incoming=tmp_path / "incoming")
    item = inbox.add(_image(0), _answer("crack"), MODEL)
    drawn = np.zeros((40, 56), np.uint8)
    drawn[2:8, 2:8] = 255
    two_frames = io.BytesIO()
    Image.fromarray(drawn).save(
        two_frames, "PNG", save_all=True, append_images=[Image.fromarray(255 - drawn)]
    )
    cases = [
        (_lying_chunk_length(_png(drawn)), 400, "truncated or corrupt PNG"),
        (
            png_with_size(100_000, 100_000),
            413,
            "100000x100000 pixels exceeds the limit of 2240 pixels",
        ),
        (png_with_size(57, 40), 413, "exceeds the limit of 2240 pixels"),
        (two_frames.getvalue(), 415, "multi-frame PNG"),
        (_png(rgb_image(40, 56))[:60], 400, "not a decodable image"),
        (b"GIF89a" + bytes(40), 415, "GIF images are not accepted"),
    ]

    def decoder_must_not_run(data):
        raise AssertionError("the mask was decoded")

    monkeypatch.setattr(inbox_module, "_decode_mask", decoder_must_not_run)
    for mask, status, message in cases:
        with pytest.raises(
            InvalidReview, match="the mask must be a PNG file at the image's size, 56x40"
        ) as refused:
            inbox.review(item.id, "crack", mask, "ann")
        assert refused.value.status == status and message in str(refused.value)
    assert [i["id"] for i in inbox.list()] == [item.id]
    assert not (tmp_path / "incoming").exists() or not any(
        p.is_file() for p in (tmp_path / "incoming").rglob("*")
    )
    _check_consistent(inbox)
    monkeypatch.undo()
    assert inbox.review(item.id, "crack", _png(drawn), "ann").mask  # a real mask still goes through


def test_writer_queue_refuses_when_full_and_never_blocks(tmp_path, monkeypatch):
    inbox = Inbox(tmp_path / "inbox")
    release = threading.Event()
    original = Inbox.add

    def slow_add(self, *args, **kwargs):
        release.wait(10)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Inbox, "add", slow_add)
    writer = InboxWriter(inbox, max_queue=2)
    start = time.monotonic()
    accepted = [writer.submit(_png(_image(i)), _answer(), MODEL) for i in range(4)]
    assert time.monotonic() - start < 1.0  # submit does not wait for the disk
    assert accepted == [True, True, False, False] and writer.counters["refused_busy"] == 2
    release.set()
    assert writer.join(20)
    assert len(inbox.list()) == 2 and inbox.counters["stored"] == 2


def test_review_command_lists_shows_accepts_and_discards(tmp_path, capsys):
    from defectflow.cli import main

    inbox = Inbox(tmp_path / "inbox", incoming=tmp_path / "incoming")
    first = inbox.add(_image(0), _answer("crack"), MODEL)
    second = inbox.add(_image(1), _answer("good"), MODEL)
    where = ["review", "--inbox", str(tmp_path / "inbox"), "--incoming", str(tmp_path / "incoming")]

    assert main([*where, "list"]) == 0
    out = capsys.readouterr().out
    assert first.id in out and second.id in out and "crack" in out
    assert main([*where, "show", first.id, "--out", str(tmp_path / "show")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["prediction"]["class"] == "crack" and "mask_png_base64" not in shown["prediction"]
    assert cv2.imread(str(tmp_path / "show" / f"{first.id}_overlay.png")).shape == (40, 56, 3)

    assert main([*where, "accept", first.id, "--label", "scratch"]) == 1
    assert "not a class of model" in capsys.readouterr().err
    mask_file = tmp_path / "mask.png"
    drawn = np.zeros((40, 56), np.uint8)
    drawn[0:4, 0:4] = 255
    mask_file.write_bytes(_png(drawn))
    assert (
        main(
            [
                *where,
                "accept",
                first.id,
                "--label",
                "poke",
                "--mask",
                str(mask_file),
                "--reviewer",
                "cli",
            ]
        )
        == 0
    )
    assert f"test/poke/inbox-{first.id}.png" in capsys.readouterr().out
    assert main([*where, "discard", second.id]) == 0
    assert main([*where, "discard", second.id]) == 1
    assert "already discarded" in capsys.readouterr().err
    assert [(s.label, s.mask_path is not None) for s in scan_dataset(tmp_path / "incoming")] == [
        ("poke", True)
    ]
    assert read_provenance(tmp_path / "incoming")[0]["reviewer"] == "cli"
    assert (
        main(["review", "--inbox", str(tmp_path / "none"), "--incoming", str(tmp_path), "list"])
        == 2
    )


def test_an_unknown_defect_answer_is_kept_for_review_and_named_by_a_person(tmp_path):
    """The anomaly score's answer has no class probability of its own: its confidence is
    stored, and the reviewer names the defect (with the anomaly map as the mask)."""
    inbox = Inbox(tmp_path / "inbox", incoming=tmp_path / "incoming")
    answer = {
        **_answer("crack"),
        "class": "unknown_defect",
        "confidence": 0.12,
        "anomaly_score": 41.5,
        "probabilities": {c: (0.88 if c == "good" else 0.024) for c in CLASSES},
    }
    stored = inbox.add(_image(3), answer, MODEL)
    assert stored.stored, stored.reason
    prediction = inbox.get(stored.id)["prediction"]
    assert prediction["class"] == "unknown_defect" and prediction["confidence"] == 0.12
    assert prediction["anomaly_score"] == 41.5
    done = inbox.review(stored.id, "poke", "keep", "ann")
    assert (tmp_path / "incoming" / done.image).parent.name == "poke"
    without_confidence = {k: v for k, v in answer.items() if k != "confidence"}
    assert inbox.add(_image(4), without_confidence, MODEL).reason == "invalid"
