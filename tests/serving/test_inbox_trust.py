"""Reviewer trust in the review inbox (defectflow.serving.inbox.trust and review): votes, the
policy (min_reviews distinct agreeing reviewers, or one verified trusted reviewer), disputes,
discards, the migration of an index from before votes, and `scan_training_data` taking only
incoming images whose provenance meets the policy it records. Real sqlite, real files."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading

import cv2
import numpy as np
import pytest
from helpers_inbox import answer as _answer
from helpers_inbox import image as _image
from helpers_inbox import png as _png

from defectflow.data.mvtec import scan_dataset, scan_training_data
from defectflow.inference.preprocessing import read_mask
from defectflow.serving.inbox import (
    ITEMS_DIR,
    Inbox,
    InvalidReview,
    ItemNotPending,
    Reviewer,
    ReviewPolicy,
    parse_reviewer_tokens,
    read_provenance,
)

MODEL = "defectflow:trust1"


def _inbox(tmp_path, min_reviews: int = 2, trusted: tuple[str, ...] = ()) -> Inbox:
    return Inbox(
        tmp_path / "inbox",
        incoming=tmp_path / "incoming",
        policy=ReviewPolicy(min_reviews, trusted),
    )


def _add(inbox: Inbox, seed: int, label: str = "crack") -> str:
    stored = inbox.add(_image(seed), _answer(label), MODEL)
    assert stored.stored, stored
    return stored.id


def _exported(tmp_path) -> set[str]:
    incoming = tmp_path / "incoming"
    if not incoming.is_dir():
        return set()
    return {p.stem for p in incoming.rglob("inbox-*") if not p.stem.endswith("_mask")}


def _dataset(tmp_path):
    root = tmp_path / "data"
    for name, value in (("train/good/000.png", 90), ("test/crack/000.png", 30)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / name), np.full((8, 8, 3), value, np.uint8))
    (root / "ground_truth/crack").mkdir(parents=True)
    cv2.imwrite(str(root / "ground_truth/crack/000_mask.png"), np.full((8, 8), 255, np.uint8))
    return root


def test_two_distinct_reviewers_must_agree_and_the_same_one_twice_counts_once(tmp_path):
    inbox = _inbox(tmp_path, min_reviews=2)
    item = _add(inbox, 0)

    first = inbox.review(item, "crack", "keep", "ann")
    assert first.status == "pending" and first.image is None and first.mask is None
    assert [v["reviewer"] for v in first.votes] == ["ann"] and not first.disputed
    assert _exported(tmp_path) == set() and read_provenance(tmp_path / "incoming") == []
    listed = inbox.list()
    assert [i["id"] for i in listed] == [item]
    assert [(v["reviewer"], v["identity"], v["label"], v["mask"]) for v in listed[0]["votes"]] == [
        ("ann", "local", "crack", "prediction")
    ]

    again = inbox.review(item, "crack", "keep", " ann ")  # the same reviewer: still one vote
    assert again.status == "pending" and len(again.votes) == 1
    assert _exported(tmp_path) == set() and inbox.get(item)["status"] == "pending"

    done = inbox.review(item, "crack", "keep", "bob")
    assert done.status == "reviewed" and done.met_by == "agreement"
    assert done.image == f"test/crack/inbox-{item}.png"
    assert _exported(tmp_path) == {f"inbox-{item}"}
    (entry,) = read_provenance(tmp_path / "incoming")
    assert entry["reviewer"] == "bob" and entry["identity"] == "local"
    assert entry["policy"] == {"min_reviews": 2, "trusted_reviewers": []}
    assert entry["met_by"] == "agreement" and entry["mask_choice"] == "prediction"
    assert [(v["reviewer"], v["label"]) for v in entry["votes"]] == [
        ("ann", "crack"),
        ("bob", "crack"),
    ]
    reviewed = inbox.list("reviewed")[0]
    assert reviewed["reviewer"] == "bob" and reviewed["reviewer_identity"] == "local"
    assert len(reviewed["votes"]) == 2
    assert list((tmp_path / "inbox" / ITEMS_DIR).iterdir()) == []
    with pytest.raises(ItemNotPending, match="already reviewed"):
        inbox.review(item, "crack", "keep", "carol")


def test_disagreeing_votes_are_recorded_and_nothing_is_exported_until_they_agree(tmp_path):
    inbox = _inbox(tmp_path, min_reviews=2)
    item = _add(inbox, 1)
    inbox.review(item, "crack", "keep", "ann")
    split = inbox.review(item, "poke", "keep", "bob")
    assert split.status == "pending" and split.disputed
    # A third vote agreeing with the first does not outvote the dissent.
    third = inbox.review(item, "crack", "keep", "carol")
    assert third.status == "pending" and third.disputed and len(third.votes) == 3
    assert _exported(tmp_path) == set()
    listed = inbox.list()[0]
    assert listed["disputed"] and {v["reviewer"]: v["label"] for v in listed["votes"]} == {
        "ann": "crack",
        "bob": "poke",
        "carol": "crack",
    }
    # Invalid votes are not recorded at all.
    with pytest.raises(InvalidReview):
        inbox.review(item, "crack", "clear", "dave")
    assert len(inbox.get(item)["votes"]) == 3
    # The dissenter changes their vote: all agree, it is written.
    done = inbox.review(item, "crack", "keep", "bob")
    assert done.status == "reviewed" and not done.disputed
    assert _exported(tmp_path) == {f"inbox-{item}"}


def test_the_mask_choice_is_part_of_the_agreement(tmp_path):
    inbox = _inbox(tmp_path, min_reviews=2)
    a, b = np.zeros((40, 56), np.uint8), np.zeros((40, 56), np.uint8)
    a[0:10, 0:10] = 255
    b[20:30, 20:30] = 255
    same, differ = _add(inbox, 2), _add(inbox, 3)
    assert inbox.review(differ, "poke", _png(a), "ann").status == "pending"
    disputed = inbox.review(differ, "poke", _png(b), "bob")
    assert disputed.status == "pending" and disputed.disputed  # same label, other mask
    kept = inbox.review(differ, "poke", "keep", "carol")
    assert kept.status == "pending" and kept.disputed

    assert inbox.review(same, "poke", _png(a), "ann").status == "pending"
    a200 = np.where(a > 0, 200, 0).astype(np.uint8)  # the same defect pixels, another value
    done = inbox.review(same, "poke", _png(a200), "bob")
    assert done.status == "reviewed"
    assert _exported(tmp_path) == {f"inbox-{same}"}
    assert np.array_equal(
        read_mask(tmp_path / "incoming" / done.mask), (a > 0).astype(np.uint8)
    )  # the agreed upload, kept with the first vote
    entry = read_provenance(tmp_path / "incoming")[0]
    assert entry["mask_source"] == "upload" and entry["mask_choice"].startswith("upload:")


def test_a_trusted_reviewer_with_their_own_token_exports_at_once(tmp_path):
    inbox = _inbox(tmp_path, min_reviews=3, trusted=("dana",))
    quick, claimed, settled = _add(inbox, 4), _add(inbox, 5), _add(inbox, 6, "good")

    done = inbox.review(quick, "crack", "keep", Reviewer("dana", "token"))
    assert done.status == "reviewed" and done.met_by == "trusted" and done.identity == "token"
    entry = read_provenance(tmp_path / "incoming")[0]
    assert entry["identity"] == "token" and entry["met_by"] == "trusted"
    assert entry["policy"] == {"min_reviews": 3, "trusted_reviewers": ["dana"]}

    # The name alone, claimed with the shared token (or locally), is one vote like any other.
    for established in ("token-holder", "local", "anonymous"):
        vote = inbox.review(claimed, "crack", "keep", Reviewer("dana", established))
        assert vote.status == "pending" and len(vote.votes) == 1 and vote.identity == established

    # A dispute a trusted reviewer settles: their vote decides.
    inbox.review(settled, "good", "keep", "ann")
    drawn = np.zeros((40, 56), np.uint8)
    drawn[1:5, 1:5] = 255
    inbox.review(settled, "poke", _png(drawn), "bob")
    decided = inbox.review(settled, "good", "keep", Reviewer("dana", "token"))
    assert decided.status == "reviewed" and decided.met_by == "trusted" and decided.disputed
    assert decided.image == f"train/good/inbox-{settled}.png"
    assert _exported(tmp_path) == {f"inbox-{quick}", f"inbox-{settled}"}


def test_discarded_items_are_never_exported(tmp_path):
    inbox = _inbox(tmp_path, min_reviews=2)
    item = _add(inbox, 7)
    inbox.review(item, "crack", "keep", "ann")
    inbox.discard(item)
    with pytest.raises(ItemNotPending, match="already discarded"):
        inbox.review(item, "crack", "keep", "bob")
    assert _exported(tmp_path) == set() and read_provenance(tmp_path / "incoming") == []
    discarded = inbox.list("discarded")[0]
    assert discarded["status"] == "discarded" and [v["reviewer"] for v in discarded["votes"]] == [
        "ann"
    ]


def test_the_default_policy_is_one_review(tmp_path):
    inbox = Inbox(tmp_path / "inbox", incoming=tmp_path / "incoming")
    assert inbox.policy == ReviewPolicy(1, ())
    done = inbox.review(_add(inbox, 8), "crack", "keep", "ann")
    assert done.status == "reviewed" and done.met_by == "agreement"


def test_concurrent_votes_export_once(tmp_path):
    """Two reviewers in two threads (each its own Inbox, as two processes would be) vote at
    once on the same items: each item is written exactly once, with both votes."""
    inbox = _inbox(tmp_path, min_reviews=2)
    items = [_add(inbox, 100 + i) for i in range(6)]
    errors = []

    def vote(name):
        own = _inbox(tmp_path, min_reviews=2)
        for item in items:
            try:
                own.review(item, "crack", "keep", name)
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

    threads = [threading.Thread(target=vote, args=(n,)) for n in ("ann", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    entries = read_provenance(tmp_path / "incoming")
    assert sorted(e["inbox_id"] for e in entries) == sorted(items)
    assert all({v["reviewer"] for v in e["votes"]} == {"ann", "bob"} for e in entries)


_OLD_SCHEMA = """
CREATE TABLE items (
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
CREATE INDEX items_state_created ON items(state, created);
"""


def test_an_index_from_before_votes_is_migrated(tmp_path):
    """The index as the inbox wrote it before votes (no `votes` table, no reviewer_identity,
    user_version 0), with a pending and a reviewed item: opened, it is migrated once, keeps its
    items, and votes work."""
    made = Inbox(tmp_path / "inbox", incoming=tmp_path / "incoming")
    pending, old_reviewed = _add(made, 9), _add(made, 10)
    conn = sqlite3.connect(made.index_path)
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM items")]
    conn.close()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / "inbox" / f"index.sqlite3{suffix}").unlink(missing_ok=True)
    old = sqlite3.connect(tmp_path / "inbox" / "index.sqlite3")
    old.executescript(_OLD_SCHEMA)
    for row in rows:
        row = {k: v for k, v in row.items() if k != "reviewer_identity"}
        if row["id"] == old_reviewed:
            row.update(state="reviewed", label="crack", reviewer="ann", reviewed_at=1.0)
        old.execute(
            f"INSERT INTO items ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
            tuple(row.values()),
        )
    old.commit()
    assert old.execute("PRAGMA user_version").fetchone()[0] == 0
    old.close()

    inbox = _inbox(tmp_path, min_reviews=2)
    assert [i["id"] for i in inbox.list()] == [pending]
    reviewed = inbox.list("reviewed")[0]
    assert reviewed["reviewer"] == "ann" and reviewed["reviewer_identity"] is None
    assert reviewed["votes"] == []
    assert inbox.review(pending, "crack", "keep", "ann").status == "pending"
    assert inbox.review(pending, "crack", "keep", "bob").status == "reviewed"

    conn = sqlite3.connect(inbox.index_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        assert "reviewer_identity" in {r[1] for r in conn.execute("PRAGMA table_info(items)")}
        assert conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0] == 2
    finally:
        conn.close()
    Inbox(tmp_path / "inbox").list()  # opening again: nothing to migrate, nothing breaks


def test_incoming_images_need_provenance_meeting_its_policy(tmp_path, caplog):
    """Only images the inbox wrote under its policy join the training data: one copied in by
    hand, or whose provenance line was edited to fewer votes than its policy, is left out with
    a warning naming it; a line from before votes (one review was the rule) still counts."""
    root = _dataset(tmp_path)
    inbox = _inbox(tmp_path, min_reviews=2)
    item = _add(inbox, 11)
    inbox.review(item, "crack", "keep", "ann")
    inbox.review(item, "crack", "keep", "bob")
    incoming = tmp_path / "incoming"

    merged = scan_training_data(root, incoming=incoming)
    assert {s.path.name for s in merged if s.origin.startswith("incoming/")} == {
        f"inbox-{item}.png"
    }

    # By hand: an image with its mask and no provenance, and a good one.
    cv2.imwrite(str(incoming / "test/crack/copied.png"), np.full((8, 8, 3), 10, np.uint8))
    cv2.imwrite(
        str(incoming / "ground_truth/crack/copied_mask.png"), np.full((8, 8), 255, np.uint8)
    )
    (incoming / "train/good").mkdir(parents=True)
    cv2.imwrite(str(incoming / "train/good/mine.png"), np.full((8, 8, 3), 200, np.uint8))
    # A line claiming an image with one vote where its policy asks for two.
    cv2.imwrite(str(incoming / "test/crack/edited.png"), np.full((8, 8, 3), 20, np.uint8))
    cv2.imwrite(
        str(incoming / "ground_truth/crack/edited_mask.png"), np.full((8, 8), 255, np.uint8)
    )
    entry = {**read_provenance(incoming)[0], "image": "test/crack/edited.png"}
    entry["votes"] = entry["votes"][:1]
    # A line from before votes: a reviewer, no policy.
    cv2.imwrite(str(incoming / "test/crack/legacy.png"), np.full((8, 8, 3), 40, np.uint8))
    cv2.imwrite(
        str(incoming / "ground_truth/crack/legacy_mask.png"), np.full((8, 8), 255, np.uint8)
    )
    legacy = {
        "inbox_id": "x",
        "image": "test/crack/legacy.png",
        "label": "crack",
        "reviewer": "ann",
    }
    with (incoming / "provenance.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n" + json.dumps(legacy) + "\n" + "{cut short\n")
    assert len(scan_dataset(incoming)) == 5  # the dataset itself has them all

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="defectflow.data.mvtec"):
        merged = scan_training_data(root, incoming=incoming)
    assert sorted(s.path.name for s in merged if s.origin.startswith("incoming/")) == [
        f"inbox-{item}.png",
        "legacy.png",
    ]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "3 image(s)" in warning and "left out of training" in warning
    for name in ("test/crack/copied.png", "train/good/mine.png", "test/crack/edited.png"):
        assert name in warning
    assert "votes short of its policy" in warning

    # Nothing but unreviewed files: the data alone, no failure.
    only = tmp_path / "only"
    (only / "train/good").mkdir(parents=True)
    cv2.imwrite(str(only / "train/good/x.png"), np.full((8, 8, 3), 7, np.uint8))
    assert scan_training_data(root, incoming=only) == scan_dataset(root)


def test_reviewer_tokens_are_name_token_pairs():
    assert parse_reviewer_tokens(None) == {} and parse_reviewer_tokens("  ") == {}
    assert parse_reviewer_tokens("ann:t-1, bob:t:2\ncarol:x") == {
        "t-1": "ann",
        "t:2": "bob",
        "x": "carol",
    }
    for text, message in [
        ("ann", "expected name:token"),
        ("ann:", "expected name:token"),
        (":tok", "name is 1 to 200"),
        ("ann:a,ann:b", "more than one token"),
        ("ann:same,bob:same", "also the token of another reviewer"),
    ]:
        with pytest.raises(ValueError, match=message) as raised:
            parse_reviewer_tokens(text)
        assert "same" not in str(raised.value) or "same" in message  # never shows a token


def test_the_policy_refuses_fewer_than_one_review():
    with pytest.raises(ValueError, match="min_reviews must be >= 1"):
        ReviewPolicy(0)
    assert "2 distinct reviewers" in ReviewPolicy(2, ("dana",)).describe()
    assert "dana" in ReviewPolicy(2, ("dana",)).describe()


def test_review_command_votes_under_the_policy_of_its_config(tmp_path, capsys):
    from defectflow.cli import main

    config = tmp_path / "two.yaml"
    config.write_text("serve:\n  inbox:\n    min_reviews: 2\n    trusted_reviewers: [dana]\n")
    inbox = Inbox(tmp_path / "inbox", incoming=tmp_path / "incoming")
    item = _add(inbox, 12)
    where = [
        "review",
        "--inbox",
        str(tmp_path / "inbox"),
        "--incoming",
        str(tmp_path / "incoming"),
        "--config",
        str(config),
    ]
    accept = [*where, "accept", item, "--label", "crack"]
    assert main([*accept, "--reviewer", "ann"]) == 0
    out = capsys.readouterr().out
    assert "vote recorded (ann: crack)" in out and "still pending" in out
    assert "2 distinct reviewers must agree" in out
    assert main([*where, "list"]) == 0
    out = capsys.readouterr().out
    assert "ann:crack" in out and "review policy: 2 distinct reviewers" in out
    # On the command line a name is claimed (identity local): dana is one vote, not trusted.
    assert main([*accept, "--reviewer", "dana", "--label", "poke", "--mask", "keep"]) == 0
    assert "(disputed)" in capsys.readouterr().out and _exported(tmp_path) == set()
    assert main([*accept, "--reviewer", "dana"]) == 0  # dana changes her vote
    assert f"test/crack/inbox-{item}.png" in capsys.readouterr().out
    (entry,) = read_provenance(tmp_path / "incoming")
    assert entry["identity"] == "local" and entry["met_by"] == "agreement"
    assert {v["reviewer"] for v in entry["votes"]} == {"ann", "dana"}
