"""The artifact contract: the decision policy a model folder stores and every prediction uses."""

import dataclasses

import numpy as np
import pytest

from defectflow.artifacts import DecisionPolicy, ModelInfo
from defectflow.inference.postprocessing import UNKNOWN_DEFECT, postprocess

CLASSES = ["good", "crack", "poke"]


def test_model_json_round_trips_the_policy(tmp_path):
    info = ModelInfo(
        CLASSES,
        64,
        0.4,
        defect_threshold=0.3,
        temperature=1.7,
        confidence_threshold=0.8,
        anomaly_threshold=12.5,
        anomaly={"bank": 10},
    )
    info.save(tmp_path)
    policy = ModelInfo.load(tmp_path).policy
    assert policy == DecisionPolicy(tuple(CLASSES), 0.4, 0.3, 1.7, 0.8, 12.5)


def test_with_policy_replaces_only_the_decision_fields():
    info = ModelInfo(CLASSES, 64, 0.5, serving_format="tflite", anomaly={"bank": 10})
    chosen = DecisionPolicy(
        CLASSES,
        0.2,
        defect_threshold=0.6,
        temperature=0.9,
        confidence_threshold=0.7,
        anomaly_threshold=3.0,
    )
    updated = info.with_policy(chosen)
    assert updated.policy == chosen
    assert updated.serving_format == "tflite" and updated.anomaly == {"bank": 10}
    assert info.policy == DecisionPolicy(CLASSES, 0.5)  # the original is left as it was
    with pytest.raises(ValueError, match="not the model's"):
        info.with_policy(dataclasses.replace(chosen, classes=("good", "scratch", "poke")))


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", 0.0),
        ("temperature", -1.0),
        ("temperature", float("nan")),
        ("mask_threshold", -0.5),
        ("defect_threshold", -0.1),
        ("confidence_threshold", float("inf")),
        ("anomaly_threshold", float("nan")),
    ],
)
def test_a_policy_out_of_range_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        DecisionPolicy(CLASSES, **{field: value})


def test_a_threshold_above_one_means_never():
    probs = np.array([0.05, 0.9, 0.05])
    soft = np.zeros((4, 4, 1), np.float32)
    never_sure = DecisionPolicy(CLASSES, confidence_threshold=1.01)
    assert postprocess(probs, soft, (4, 4), never_sure).status == "uncertain"


def test_postprocess_answers_by_the_policy_it_is_given():
    probs = np.array([0.55, 0.30, 0.15])  # the classifier says good, P(defect) = 0.45
    soft = np.zeros((8, 8, 1), np.float32)
    distances = np.full((4, 4, 1), 5.0, np.float32)
    plain = DecisionPolicy(CLASSES)
    assert postprocess(probs, soft, (8, 8), plain, anomaly_map=distances).label == "good"
    lower = dataclasses.replace(plain, defect_threshold=0.4)
    assert postprocess(probs, soft, (8, 8), lower).label == "crack"
    flagged = dataclasses.replace(plain, anomaly_threshold=4.0)
    answer = postprocess(probs, soft, (8, 8), flagged, anomaly_map=distances)
    assert answer.label == UNKNOWN_DEFECT and answer.status == "uncertain"
    assert answer.anomaly_threshold == 4.0 and answer.mask.sum() == 64
