import math

from omegaconf import OmegaConf

from defectflow.evaluation.gate import decide

METRICS = {"accuracy": 0.9, "presence_accuracy": 0.95, "defect_dice": 0.4}


def _gate(**kw):
    base = {
        "min_accuracy": 0.8,
        "min_presence_accuracy": 0.9,
        "min_defect_dice": 0.3,
        "promote": True,
        "tolerance": {"accuracy": 0.01, "presence_accuracy": 0.01, "defect_dice": 0.02},
    }
    return OmegaConf.create({**base, **kw})


def test_first_model_passes_on_absolute_thresholds_alone():
    decision = decide(METRICS, _gate())
    assert decision.passed and decision.champion is None
    assert [c["kind"] for c in decision.checks] == ["absolute"] * 3
    decision.promoted = True
    assert decision.message.startswith("promoted: accuracy 0.9000 >= minimum 0.8000")
    assert "no production model yet" in decision.message
    assert "| accuracy | absolute | 0.9000 | 0.8000 |  |  | yes |" in decision.markdown()


def test_rejection_lists_every_failed_reason_and_only_those():
    decision = decide(METRICS, _gate(min_accuracy=0.95, min_defect_dice=0.5))
    assert not decision.passed
    assert decision.message.startswith("not promoted: ")
    assert "accuracy 0.9000 < minimum 0.9500" in decision.message
    assert "defect_dice 0.4000 < minimum 0.5000" in decision.message
    assert "presence_accuracy" not in decision.message


def test_challenger_may_trail_the_champion_by_the_tolerance_only():
    champion = {"accuracy": 0.905, "presence_accuracy": 0.95, "defect_dice": 0.45}
    decision = decide(METRICS, _gate(), champion, "defectflow:champ")
    by_metric = {c["metric"]: c for c in decision.checks if c["kind"] == "champion"}
    assert by_metric["accuracy"]["passed"]  # 0.900 >= 0.905 - 0.01
    assert by_metric["presence_accuracy"]["passed"]  # equal
    assert not by_metric["defect_dice"]["passed"]  # 0.40 < 0.45 - 0.02
    assert by_metric["defect_dice"]["champion_value"] == 0.45
    assert by_metric["defect_dice"]["threshold"] == 0.43
    assert not decision.passed
    assert decision.message == (
        "not promoted: defect_dice 0.4000 < champion 0.4500 - tolerance 0.0200 "
        "against champion defectflow:champ"
    )
    record = decision.to_dict()
    assert record["champion"] == "defectflow:champ" and record["message"] == decision.message
    assert len(record["checks"]) == 6


def test_a_better_challenger_passes_but_promotion_can_be_off():
    champion = {"accuracy": 0.8, "presence_accuracy": 0.9, "defect_dice": 0.3}
    decision = decide(METRICS, _gate(), champion, "defectflow:champ")
    assert decision.passed and not decision.promoted
    assert "promotion is off" in decision.message


def test_an_incomparable_champion_is_noted_and_absolute_thresholds_decide():
    decision = decide(
        METRICS, _gate(), None, "defectflow:champ", champion_note="champion predicts other classes"
    )
    assert decision.passed and decision.champion is None
    assert "champion predicts other classes" in decision.message


def test_nan_metric_fails_a_positive_threshold_and_nan_champion_sets_no_bar():
    metrics = {**METRICS, "defect_dice": math.nan}
    assert not decide(metrics, _gate()).passed
    assert decide(metrics, _gate(min_defect_dice=0.0)).passed
    champion = {"accuracy": 0.9, "presence_accuracy": 0.95, "defect_dice": math.nan}
    assert decide(METRICS, _gate(), champion, "defectflow:champ").passed
