"""Ten nights of retraining on growing data, with reviewed images arriving every night, one
reviewer of them mislabelling: the split, the golden test set and the gate stay honest.

Each night new curated images land in the dataset root, the review inbox gets new uncertain
answers, a trusted reviewer labels some correctly and an untrusted one mislabels others (the
policy asks two agreeing reviewers, or one trusted), and the real `nightly-retrain` flow runs.
After every night the test checks, from what the run stored:

- no file (by content) ever changed split, in particular none moved from train to test;
- the test split holds curated files only, never an inbox image;
- the gate's decision is reproducible: both models re-evaluated on the stored manifest's test
  split (minus what test_set.json left out) give the stored figures and the same decision;
- production is never replaced by a model that is worse on that golden set.

The table of nights is printed (run with -s to see it) and written to nights.json.
"""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from defectflow import registry
from defectflow.config import load_config
from defectflow.data.mvtec import scan_dataset
from defectflow.data.synthetic import DEFECT_TYPES, generate_dataset, render_sample
from defectflow.evaluation.evaluate import evaluate
from defectflow.evaluation.gate import GATED, decide
from defectflow.inference.predictor import Predictor
from defectflow.serving.inbox import Inbox
from defectflow.serving.inbox.trust import Reviewer, ReviewPolicy

pytestmark = pytest.mark.integration

NIGHTS = 10
MODEL = "nightlysim"
SIZE = 64
TRUSTED, UNTRUSTED = Reviewer("Ann", "token"), Reviewer("Mallory", "token-holder")


def _write(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb)


def _add_curated(root: Path, night: int) -> None:
    """Two new good images and one new image of every defect type, with its mask."""
    for label in ("good", *DEFECT_TYPES):
        for i in range(2 if label == "good" else 1):
            rng = np.random.default_rng([1000, night, i, hash(label) % 997])
            image, mask = render_sample(rng, SIZE, None if label == "good" else label)
            stem = f"n{night:02d}{i}"
            folder = "train" if label == "good" else "test"
            _write(root / folder / label / f"{stem}.png", image)
            if label != "good":
                _write(root / "ground_truth" / label / f"{stem}_mask.png", mask)


def _answer(mask: np.ndarray, classes: list[str]) -> dict:
    """An uncertain 'good' answer, as the service would have queued it."""
    probs = {c: 0.5 / (len(classes) - 1) for c in classes}
    probs["good"] = 0.5
    ok, png = cv2.imencode(".png", mask)
    return {
        "class": "good",
        "probabilities": probs,
        "confidence": 0.5,
        "status": "uncertain",
        "is_defective": False,
        "mask_png_base64": base64.b64encode(png.tobytes()).decode(),
        "mask_size": [SIZE, SIZE],
    }


def _reviews(inbox: Inbox, night: int, classes: list[str]) -> dict:
    """Three defect images reach the inbox: Ann labels one right, Mallory mislabels two."""
    done = {"trusted": 0, "mislabelled": 0}
    for i, defect in enumerate(DEFECT_TYPES[:3]):
        rng = np.random.default_rng([2000, night, i])
        image, mask = render_sample(rng, SIZE, defect)
        added = inbox.add(image, _answer(mask, classes), f"{MODEL}:night{night}")
        assert added.stored, added
        if i == 0:
            result = inbox.review(added.id, defect, "keep", TRUSTED)
            assert result.status == "reviewed" and result.met_by == "trusted"
            done["trusted"] += 1
        else:
            wrong = "good" if i == 1 else DEFECT_TYPES[(i + 1) % len(DEFECT_TYPES)]
            result = inbox.review(
                added.id, wrong, "clear" if wrong == "good" else "keep", UNTRUSTED
            )
            assert result.status == "pending", "one untrusted vote wrote training data"
            done["mislabelled"] += 1
    return done


def _manifest(run_dir: Path) -> list[dict]:
    with (run_dir / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _golden(run_dir: Path, rows: list[dict]) -> list:
    left_out = {
        name
        for names in json.loads((run_dir / "test_set.json").read_text())["leaked"].values()
        for name in names
    }
    samples = {s.path: s for s in scan_dataset(Path(rows[0]["path"]).parents[2])}
    golden = [
        r
        for r in rows
        if r["split"] == "test" and f"{r['label']}/{Path(r['path']).name}" not in left_out
    ]
    return [samples[Path(r["path"])] for r in golden]


def _figures(metrics: dict) -> str:
    return ", ".join(f"{m} {metrics[m]:.3f}" for m in GATED)


def test_ten_nights_keep_the_split_the_golden_set_and_the_gate_honest(prefect_api, tmp_path):
    from defectflow.orchestration.flows.nightly import nightly_retrain

    root = generate_dataset(
        tmp_path / "data", image_size=SIZE, n_train_good=12, n_test_good=3, n_per_defect=4
    )
    incoming = tmp_path / "incoming"
    inbox = Inbox(tmp_path / "inbox", incoming=incoming, policy=ReviewPolicy(2, ("Ann",)))
    overrides = [
        f"data.root={root}",
        f"serve.inbox.incoming={incoming}",
        f"package.model_name={MODEL}",
        "package.build_bento=false",
        "tune.enabled=false",
        "drift.enabled=false",
    ]
    cfg = load_config("tiny", overrides)
    classes = ["good", *sorted(DEFECT_TYPES)]
    batch = int(cfg.train.batch_size)
    first_split: dict[str, str] = {}
    nights = []
    for night in range(1, NIGHTS + 1):
        if night > 1:
            _add_curated(root, night)
        reviews = _reviews(inbox, night, classes)
        production_before = registry.production_tag(MODEL)
        state = nightly_retrain(config="tiny", overrides=overrides, return_state=True)
        assert state.is_completed(), state.message
        summary = state.result()
        run_dir = Path(summary["run_dir"])
        rows = _manifest(run_dir)

        # No file ever changes split; the test split is curated only.
        for r in rows:
            assert first_split.setdefault(r["sha256"], r["split"]) == r["split"], r["path"]
            if r["split"] == "test":
                assert not r["origin"].startswith("incoming/"), f"inbox image in test: {r['path']}"

        # The decision again, from the stored manifest: both models on the golden set.
        golden = _golden(run_dir, rows)
        gate = json.loads((run_dir / "gate.json").read_text())
        challenger_tag = summary["model_tag"]
        challenger = evaluate(
            Predictor.load(registry.model_dir(challenger_tag)), golden, batch
        ).metrics
        champion = None
        if gate["champion"]:
            assert gate["champion"] == production_before
            champion = evaluate(
                Predictor.load(registry.model_dir(gate["champion"])), golden, batch
            ).metrics
        again = decide(challenger, cfg.gate, champion, gate["champion"], gate["champion_note"])
        assert again.passed == gate["passed"]
        for stored, redone in zip(gate["checks"], again.checks, strict=True):
            assert stored["metric"] == redone["metric"] and stored["kind"] == redone["kind"]
            assert stored["value"] == pytest.approx(redone["value"], abs=1e-9)
        assert gate["test_set"]["size"] == len(golden)

        # Production is never replaced by a model worse on the golden set.
        production_after = registry.production_tag(MODEL)
        if production_after != production_before and champion is not None:
            for metric in GATED:
                floor = champion[metric] - float(cfg.gate.tolerance[metric])
                assert challenger[metric] >= floor - 1e-12, (night, metric)

        nights.append(
            {
                "night": night,
                "images": len(rows),
                "reviewed_in_training": sum(r["origin"].startswith("incoming/") for r in rows),
                "reviews": reviews,
                "test_set": f"{gate['test_set']['version']} ({gate['test_set']['size']})",
                "champion": _figures(champion) if champion else "none",
                "challenger": _figures(challenger),
                "decision": gate["message"].split(":")[0],
                "production": production_after,
            }
        )

    # Mallory's labels never reached training: only Ann's reviews were written.
    provenance = [
        json.loads(line) for line in (incoming / "provenance.jsonl").read_text().splitlines()
    ]
    assert len(provenance) == NIGHTS and {p["reviewer"] for p in provenance} == {"Ann"}
    assert nights[-1]["reviewed_in_training"] == NIGHTS
    (tmp_path / "nights.json").write_text(json.dumps(nights, indent=2))
    print(
        "\n| night | images | reviewed in training | test set | champion | challenger | decision |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in nights:
        print(
            f"| {n['night']} | {n['images']} | {n['reviewed_in_training']} | {n['test_set']} "
            f"| {n['champion']} | {n['challenger']} | {n['decision']} |"
        )
