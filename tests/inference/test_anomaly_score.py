"""The anomaly score: coreset, threshold, decision score, and the head on a real encoder."""

import os
import subprocess
import sys

import numpy as np
import pytest

from defectflow.data.synthetic import DEFECT_TYPES, render_sample
from defectflow.evaluation.calibration import choose_anomaly_threshold
from defectflow.evaluation.metrics import auroc
from defectflow.inference.anomaly_score import (
    anomaly_mask,
    decision_score,
    image_score,
    image_scores,
)
from defectflow.inference.preprocessing import prepare_image
from defectflow.training.anomaly_fitting import (
    fit_memory_bank,
    greedy_coreset,
    random_projection,
)


def covering_radius(points, chosen):
    d = ((points[:, None, :] - points[chosen][None, :, :]) ** 2).sum(-1)
    return float(np.sqrt(d.min(axis=1).max()))


def test_greedy_coreset_covers_the_points_better_than_a_random_subset():
    rng = np.random.default_rng(0)
    # Two dense clusters and a few far outliers: a random subset misses the outliers.
    points = np.concatenate(
        [rng.normal(0, 1, (400, 8)), rng.normal(10, 1, (400, 8)), rng.normal(40, 1, (5, 8))]
    )
    chosen = greedy_coreset(points.astype(np.float32), 20)
    assert len(set(chosen.tolist())) == 20
    random_radii = [
        covering_radius(points, rng.choice(len(points), 20, replace=False)) for _ in range(10)
    ]
    assert covering_radius(points, chosen) <= min(random_radii)
    assert covering_radius(points, chosen) < 0.5 * np.median(
        random_radii
    )  # most random subsets miss the outliers
    assert greedy_coreset(points, 5000).tolist() == list(range(len(points)))
    with pytest.raises(ValueError, match="positive"):
        greedy_coreset(points, 0)


def test_random_projection_keeps_distances_roughly():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 256)).astype(np.float32)
    projection = random_projection(256, 64, seed=0)
    before = np.linalg.norm(x[:100] - x[100:], axis=1)
    after = np.linalg.norm(x[:100] @ projection - x[100:] @ projection, axis=1)
    assert 0.8 < np.median(after / before) < 1.2
    projection, bank = fit_memory_bank(
        x.reshape(2, 10, 10, 256), bank_size=50
    )  # whole features by default
    assert projection is None and bank.shape == (50, 256)
    assert (
        random_projection(16, 0) is None and random_projection(16, 16) is None
    )  # no reduction asked


def test_memory_bank_holds_projected_patches_of_the_good_images():
    features = np.random.default_rng(2).normal(size=(3, 4, 4, 10)).astype(np.float32)
    projection, bank = fit_memory_bank(features, bank_size=7, projection_dims=5)
    assert projection.shape == (10, 5) and bank.shape == (7, 5)
    patches = features.reshape(-1, 10) @ projection
    assert all(np.isclose(patches, row, atol=1e-6).all(axis=1).any() for row in bank)


def test_threshold_flags_at_most_the_allowed_share_of_good_images():
    scores = np.arange(1.0, 11.0)  # 10 good validation images
    assert choose_anomaly_threshold(scores, 0.0) == 10.0  # none flagged
    assert choose_anomaly_threshold(scores, 0.1) == 9.0  # one flagged (the 10)
    assert choose_anomaly_threshold(scores, 0.25) == 8.0  # two flagged
    for rate in (0.0, 0.05, 0.1, 0.25, 0.5):
        assert np.mean(scores > choose_anomaly_threshold(scores, rate)) <= rate
    with pytest.raises(ValueError, match="no good validation images"):
        choose_anomaly_threshold([], 0.05)
    with pytest.raises(ValueError, match="false_alarm_rate"):
        choose_anomaly_threshold(scores, 1.0)


def test_decision_score_exceeds_one_exactly_when_either_part_flags():
    rng = np.random.default_rng(3)
    p_defect, scores = rng.uniform(0, 1, 500), rng.uniform(0, 20, 500)
    combined = decision_score(p_defect, scores, 0.4, 12.0)
    assert np.array_equal(combined > 1, (p_defect > 0.4) | (scores > 12.0))
    assert np.array_equal(
        decision_score(p_defect, None, None, None) > 1, p_defect > 0.5
    )  # argmax, no anomaly head


def test_anomaly_mask_is_the_upsampled_map_above_the_threshold():
    coarse = np.zeros((4, 4, 1), np.float32)
    coarse[1, 2] = 10.0
    mask = anomaly_mask(coarse, (40, 60), 5.0)
    assert mask.shape == (40, 60) and mask.dtype == np.uint8
    ys, xs = np.nonzero(mask)
    assert 10 <= ys.mean() <= 20 and 30 <= xs.mean() <= 45  # cell (1, 2) of a 4x4 grid
    assert not anomaly_mask(coarse, (40, 60), 10.0).any()
    coarse[3, 3] = 4.0
    coarse[0, 0] = 1.0
    assert image_scores(coarse[None])[0] == pytest.approx(5.0)  # the mean of the top 3 patches
    assert image_score(coarse) == pytest.approx(5.0) and image_scores(
        np.full((2, 1, 1), 7.0)
    ).tolist() == [7.0, 7.0]


@pytest.fixture(scope="module")
def pretrained_unet(tmp_path_factory):
    os.environ.setdefault("KERAS_HOME", str(tmp_path_factory.mktemp("keras")))
    from defectflow.models.unet import build_model

    return build_model("lite0", 128, 6)  # ImageNet encoder (read offline), untrained heads


def test_unseen_synthetic_defect_types_score_above_the_threshold_of_good_images(pretrained_unet):
    """The memory bank sees only good capsules; every defect kind, including a stain no synthetic
    type has, scores higher than held-out good capsules."""
    from defectflow.models.anomaly_head import feature_extractor, with_anomaly_head

    rng = np.random.default_rng(0)

    def images(defect, n):
        return np.stack([prepare_image(render_sample(rng, 128, defect)[0], 128) for _ in range(n)])

    projection, bank = fit_memory_bank(
        feature_extractor(pretrained_unet).predict(images(None, 30), verbose=0),
        bank_size=500,
        projection_dims=64,
    )
    model = with_anomaly_head(pretrained_unet, projection, bank)

    def scores(batch):
        outputs = model.predict(batch, verbose=0)
        assert outputs["anomaly"].shape == (len(batch), 16, 16, 1)  # stride 8 of 128 px
        return image_scores(outputs["anomaly"])

    threshold = choose_anomaly_threshold(scores(images(None, 10)), 0.0)
    good = scores(images(None, 10))
    stained = images(None, 6)
    stained[:, 56:72, 56:72] = (20.0, 160.0, 20.0)  # a green stain: no synthetic type looks like it
    stain_scores = scores(stained)
    assert (stain_scores > threshold).all() and stain_scores.min() > good.max()
    defects = np.concatenate([scores(images(d, 6)) for d in DEFECT_TYPES])
    assert np.mean(good > threshold) <= 0.3
    assert np.mean(defects > threshold) >= 0.7
    assert auroc([0] * len(good) + [1] * len(defects), np.r_[good, defects]) >= 0.85


@pytest.fixture(scope="module")
def capsules():
    from defectflow.data.synthetic import render_sample

    rng = np.random.default_rng(7)
    return [render_sample(rng, 64, None)[0] for _ in range(8)]


def test_predictor_answers_unknown_defect_only_when_the_classifier_says_good(tmp_path, capsules):
    from helpers_models import make_anomaly_model_dir, stained

    from defectflow.artifacts import ModelInfo
    from defectflow.inference.postprocessing import ACCEPTED, UNCERTAIN, UNKNOWN_DEFECT
    from defectflow.inference.predictor import Predictor

    model_dir = make_anomaly_model_dir(tmp_path / "model", capsules)
    # A fresh process (as a server is) loads it: the head's layer registers on loading.
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from defectflow.inference.predictor import Predictor; "
            "print(Predictor.load(sys.argv[1]).has_anomaly_head)",
            str(model_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.returncode == 0 and loaded.stdout.split()[-1] == "True", loaded.stderr[-2000:]
    predictor = Predictor.load(model_dir)
    known, novel = predictor.predict_arrays([capsules[0], stained(capsules[0])])
    assert (known.label, known.is_defective, known.status) == ("good", False, ACCEPTED)
    assert not known.mask.any() and known.anomaly_score < known.anomaly_threshold
    assert (novel.label, novel.is_defective, novel.status) == (UNKNOWN_DEFECT, True, UNCERTAIN)
    assert novel.anomaly_score > novel.anomaly_threshold and novel.mask[32, 32] == 1
    assert novel.confidence == pytest.approx(1 - novel.probabilities["good"])
    answer = novel.to_json()
    assert (
        answer["class"] == UNKNOWN_DEFECT and answer["anomaly_score"] > answer["anomaly_threshold"]
    )
    # The same outputs without the anomaly map: the classifier alone says good.
    outputs = predictor.raw_outputs([stained(capsules[0])])
    assert outputs.anomaly.shape == (1, 16, 16, 1)
    assert (
        predictor.predictions([stained(capsules[0])], outputs.probabilities, outputs.masks)[0].label
        == "good"
    )
    # A classifier sure of a defect keeps its own answer and mask, whatever the anomaly score.
    info = ModelInfo.load(model_dir)
    info.defect_threshold = 0.0
    sure = Predictor(predictor.backend, info).predict_arrays([stained(capsules[0])])[0]
    assert sure.label in info.classes[1:] and sure.mask_probability.shape == (32, 32)
    # Without a threshold (not calibrated yet) the anomaly score is reported but decides nothing.
    info.defect_threshold, info.anomaly_threshold = 0.999, None
    quiet = Predictor(predictor.backend, info).predict_arrays([stained(capsules[0])])[0]
    assert quiet.label == "good" and quiet.anomaly_score > 0 and quiet.anomaly_threshold is None


def test_fitting_and_calibration_store_the_bank_and_threshold_with_the_model(
    tmp_path, tiny_dataset
):
    """fit_anomaly_head rewrites model.keras with the head; calibration picks the threshold on
    the good validation images; evaluation reports both parts of the decision."""
    from defectflow.artifacts import ModelInfo
    from defectflow.config import load_config
    from defectflow.data.mvtec import scan_dataset
    from defectflow.evaluation.calibration import calibrate_model
    from defectflow.evaluation.evaluate import evaluate
    from defectflow.evaluation.report import write_report
    from defectflow.inference.predictor import Predictor
    from defectflow.models.unet import build_model
    from defectflow.training.anomaly_fitting import fit_anomaly_head
    from defectflow.training.train import TrainResult, save_artifact

    cfg = load_config("tiny")
    samples = scan_dataset(tiny_dataset)
    classes = ["good", *sorted({s.label for s in samples} - {"good"})]
    model = build_model("plain", 32, len(classes), base_filters=4, depth=2, weights="none")
    model_dir = save_artifact(
        TrainResult(model, {}, 0.0, "/CPU:0", {}), cfg, classes, tmp_path / "model"
    )
    good = [s for s in samples if s.label == "good"]
    record = fit_anomaly_head(model_dir, good[:6], bank_size=300, projection_dims=4)
    assert (
        record["bank_size"] == 300 and record["projection_dims"] == 4 and record["grid"] == [16, 16]
    )
    thresholds = calibrate_model(
        model_dir,
        good[6:] + [s for s in samples if s.label != "good"][:6],
        anomaly_false_alarm_rate=0.0,
    )
    info = ModelInfo.load(model_dir)
    assert info.anomaly_threshold == thresholds.anomaly_threshold > 0
    assert (
        info.anomaly["threshold"] == info.anomaly_threshold
        and info.anomaly["val_false_alarm_rate"] == 0.0
    )
    assert "anomaly score" in thresholds.markdown()
    result = evaluate(Predictor.load(model_dir), samples, batch_size=8)
    m = result.metrics
    assert m["anomaly_threshold"] == info.anomaly_threshold and 0 <= m["anomaly_auroc"] <= 1
    assert set(m["classifier_only"]) == {
        "accuracy",
        "presence_accuracy",
        "defect_accuracy",
        "defect_dice",
        "false_alarm_rate",
    }
    assert m["classes"][-1] == "unknown_defect" and m["unknown_defect_answers"] == sum(
        r["predicted"] == "unknown_defect" for r in result.per_image
    )
    assert all("anomaly_score" in r and "classifier_predicted" in r for r in result.per_image)
    assert "Anomaly score" in result.markdown()
    paths = write_report(tmp_path / "report", result)
    assert paths["anomaly_scores"].stat().st_size > 0
    assert "unknown_defect answers" in paths["markdown"].read_text()
    assert "Anomaly score: defect types never labelled" in paths["html"].read_text()

    # With eval.anomaly_agreement: stored with the model, and no answer the score contradicts
    # is accepted, whatever its confidence.
    agreeing = calibrate_model(
        model_dir,
        good[6:] + [s for s in samples if s.label != "good"][:6],
        anomaly_false_alarm_rate=0.0,
        anomaly_agreement=True,
    )
    info = ModelInfo.load(model_dir)
    assert info.anomaly_agreement and agreeing.anomaly_agreement
    assert info.confidence_calibration["val_uncertain_by_disagreement"] == (
        agreeing.val_uncertain_by_disagreement
    )
    info.confidence_threshold = 0.0  # every confidence accepted: only the agreement withholds
    info.save(model_dir)
    rows = evaluate(Predictor.load(model_dir), samples, batch_size=8).per_image
    flagged = [r["anomaly_score"] > info.anomaly_threshold for r in rows]
    contradicted = [f != (r["predicted"] != "good") for r, f in zip(rows, flagged, strict=True)]
    assert any(contradicted)
    for row, withheld in zip(rows, contradicted, strict=True):
        assert row["status"] == (
            "uncertain" if withheld or row["predicted"] == "unknown_defect" else "accepted"
        ), row
