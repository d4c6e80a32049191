"""Reviewer trust in the real service (`bentoml serve service:DefectInspection` over HTTP on
127.0.0.1): who reviews (a personal reviewer token, or the service's shared token and a name),
the policy (serve.inbox.min_reviews=2, trusted_reviewers=[dana]) deciding when a vote writes
an item into the incoming dataset, and the training data taking only what the policy let in.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import cv2
import httpx
import numpy as np
import pytest
import test_review_service as review_tests
from helpers_models import make_tiny_model_dir
from helpers_processes import isolated_env, serve_bento

from defectflow.artifacts import ModelInfo
from defectflow.data.mvtec import scan_training_data
from defectflow.serving.inbox import read_provenance

pytestmark = pytest.mark.integration

SHARED = "shared-review-token"
TOKENS = {"dana": "dana-own-token", "erin": "erin-own-token"}


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("review-trust")
    model_dir = make_tiny_model_dir(root / "model")
    info = ModelInfo.load(model_dir)
    info.confidence_threshold = 1.01
    info.save(model_dir)
    env = isolated_env(root / "home")
    tag = subprocess.run(
        [sys.executable, "-c", review_tests._SAVE, str(model_dir)],
        env=env,
        cwd=root,
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
    ).stdout.split()[-1]
    inbox_dir, incoming = root / "inbox", root / "incoming"
    env.update(
        DEFECTFLOW_MODEL_TAG=tag,
        DEFECTFLOW_API_TOKEN=SHARED,
        DEFECTFLOW_REVIEWER_TOKENS=",".join(f"{n}:{t}" for n, t in TOKENS.items()),
        DEFECTFLOW_SERVE_OVERRIDES=f"serve.inbox.enabled=true serve.inbox.path={inbox_dir} "
        f"serve.inbox.incoming={incoming} serve.inbox.min_reviews=2 "
        "serve.inbox.trusted_reviewers=[dana]",
    )
    with serve_bento("service:DefectInspection", env, root / "serve.log") as url:
        yield {"url": url, "tag": tag, "inbox": inbox_dir, "incoming": incoming, "root": root,
               "log": root / "serve.log"}  # fmt: skip


def _seed(service: dict, label: str, seed: int) -> str:
    return review_tests._seed(service, label, seed)


def _vote(service: dict, item: str, token: str, **fields) -> httpx.Response:
    return httpx.post(
        f"{service['url']}/review/items/{item}", headers=_auth(token), json=fields, timeout=10
    )


def _listed(service: dict, token: str = SHARED, status: str = "pending") -> dict:
    response = httpx.get(
        f"{service['url']}/review/items",
        params={"status": status},
        headers=_auth(token),
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.json()


def _written(service: dict) -> set[str]:
    return {e["inbox_id"] for e in read_provenance(service["incoming"])}


def test_who_reviews_comes_from_the_token(service):
    shared = _listed(service)
    assert shared["you"] == {"reviewer": None, "identity": "token-holder"}
    assert shared["policy"]["min_reviews"] == 2 and shared["policy"]["trusted_reviewers"] == [
        "dana"
    ]
    assert "2 distinct reviewers must agree" in shared["policy"]["description"]
    assert _listed(service, TOKENS["erin"])["you"] == {"reviewer": "erin", "identity": "token"}
    wrong = httpx.get(f"{service['url']}/review/items", headers=_auth("nope"), timeout=10)
    assert wrong.status_code == 401 and "invalid bearer token" in wrong.json()["error"]

    item = _seed(service, "crack", 30)
    as_dana = _vote(service, item, SHARED, label="crack", mask="keep", reviewer="dana")
    assert as_dana.status_code == 403 and "reviewer token of their own" in as_dana.json()["error"]
    not_mine = _vote(service, item, TOKENS["erin"], label="crack", reviewer="dana")
    assert (
        not_mine.status_code == 403 and "this reviewer token is erin's" in not_mine.json()["error"]
    )
    assert (
        _vote(service, item, SHARED, label="crack", mask="keep").json()["error"]
        == "`reviewer` is required"
    )
    listed = {i["id"]: i for i in _listed(service)["items"]}
    assert listed[item]["votes"] == []  # refused votes are not recorded

    log = service["log"].read_text()
    assert '"review_policy":{"min_reviews":2,"trusted_reviewers":["dana"]}' in log
    assert '"reviewer_tokens":["dana","erin"]' in log
    assert not any(token in log for token in (*TOKENS.values(), SHARED))


def test_two_distinct_reviewers_must_agree_over_http(service):
    item = _seed(service, "crack", 31)
    first = _vote(service, item, SHARED, label="crack", mask="keep", reviewer="ann")
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "pending" and first.json()["image"] is None
    again = _vote(service, item, SHARED, label="crack", mask="keep", reviewer="ann")
    assert again.json()["status"] == "pending" and len(again.json()["votes"]) == 1
    assert item not in _written(service)
    listed = {i["id"]: i for i in _listed(service)["items"]}[item]
    assert [(v["reviewer"], v["identity"]) for v in listed["votes"]] == [("ann", "token-holder")]
    assert not listed["disputed"]

    done = _vote(service, item, TOKENS["erin"], label="crack", mask="keep")
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["status"] == "reviewed" and body["met_by"] == "agreement"
    assert body["reviewer"] == "erin" and body["identity"] == "token"
    assert body["image"] == f"test/crack/inbox-{item}.png"
    entry = {e["inbox_id"]: e for e in read_provenance(service["incoming"])}[item]
    assert entry["reviewer"] == "erin" and entry["identity"] == "token"
    assert {(v["reviewer"], v["identity"]) for v in entry["votes"]} == {
        ("ann", "token-holder"),
        ("erin", "token"),
    }
    assert entry["policy"] == {"min_reviews": 2, "trusted_reviewers": ["dana"]}
    detail = httpx.get(
        f"{service['url']}/review/items/{item}", headers=_auth(SHARED), timeout=10
    ).json()
    assert detail["status"] == "reviewed" and len(detail["votes"]) == 2


def test_disagreeing_votes_stay_pending_and_disputed(service):
    item = _seed(service, "crack", 32)
    drawn = np.zeros((36, 48), np.uint8)
    drawn[1:9, 1:9] = 255
    assert _vote(service, item, SHARED, label="crack", reviewer="ann").json()["status"] == "pending"
    split = httpx.post(
        f"{service['url']}/review/items/{item}",
        headers=_auth(SHARED),
        data={"label": "poke", "reviewer": "bob"},
        files={"mask": ("m.png", review_tests._png(drawn), "image/png")},
        timeout=10,
    ).json()
    assert split["status"] == "pending" and split["disputed"]
    third = _vote(service, item, TOKENS["erin"], label="crack").json()
    assert third["status"] == "pending" and third["disputed"] and len(third["votes"]) == 3
    listed = {i["id"]: i for i in _listed(service)["items"]}[item]
    assert listed["disputed"] and len(listed["votes"]) == 3
    assert item not in _written(service)
    assert not list(service["incoming"].rglob(f"inbox-{item}*"))


def test_a_trusted_reviewer_exports_at_once_and_a_discard_never(service):
    trusted = _seed(service, "crack", 33)
    done = _vote(service, trusted, TOKENS["dana"], label="crack", mask="keep").json()
    assert done["status"] == "reviewed" and done["met_by"] == "trusted"
    assert done["reviewer"] == "dana" and done["identity"] == "token"

    dropped = _seed(service, "crack", 34)
    _vote(service, dropped, SHARED, label="crack", reviewer="ann")
    discarded = httpx.post(
        f"{service['url']}/review/items/{dropped}/discard", headers=_auth(SHARED), timeout=10
    )
    assert discarded.status_code == 200
    late = _vote(service, dropped, TOKENS["erin"], label="crack")
    assert late.status_code == 409 and "already discarded" in late.json()["error"]
    assert trusted in _written(service) and dropped not in _written(service)
    assert not list(service["incoming"].rglob(f"inbox-{dropped}*"))


def test_training_takes_only_what_the_policy_let_in(service, tmp_path):
    """The nightly retrain's view: the written items join the data; an image copied into the
    incoming dataset by hand (no provenance) is left out."""
    incoming = service["incoming"]
    if not _written(service):  # run alone: let one in
        item = _seed(service, "crack", 35)
        _vote(service, item, TOKENS["dana"], label="crack")
    root = tmp_path / "data"
    for name, value in (("train/good/a.png", 90), ("test/crack/b.png", 30)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / name), np.full((8, 8, 3), value, np.uint8))
    (root / "ground_truth/crack").mkdir(parents=True)
    cv2.imwrite(str(root / "ground_truth/crack/b_mask.png"), np.full((8, 8), 255, np.uint8))
    (incoming / "train/good").mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(incoming / "train/good/by-hand.png"), np.full((8, 8, 3), 5, np.uint8))
    reviewed = {
        s.path.stem
        for s in scan_training_data(root, incoming=incoming)
        if s.origin.startswith("incoming/")
    }
    assert reviewed == {f"inbox-{i}" for i in _written(service)}
    assert "by-hand" not in reviewed
