"""The anomaly score's agreement with an answer (`anomaly_disagrees`), and what
`eval.anomaly_agreement` makes of it in the one postprocessing path."""

import numpy as np
import pytest

from defectflow.artifacts import DecisionPolicy
from defectflow.inference.postprocessing import (
    ACCEPTED,
    UNCERTAIN,
    UNKNOWN_DEFECT,
    anomaly_disagrees,
    postprocess,
)

CLASSES = ("good", "crack", "poke")


def test_the_anomaly_score_disagrees_where_it_contradicts_the_answers_presence():
    answers = np.array([0, 0, 1, 2])
    scores = np.array([1.0, 5.0, 5.0, 1.0])
    # good and not flagged, good but flagged, defect and flagged, defect but not flagged
    assert anomaly_disagrees(answers, scores, 3.0).tolist() == [False, True, False, True]
    # At the threshold a score does not flag the part (flagged means above it).
    assert anomaly_disagrees([1], [3.0], 3.0).tolist() == [True]


def _answer(score: float, agreement: bool):
    policy = DecisionPolicy(
        CLASSES, 0.5, confidence_threshold=0.6, anomaly_threshold=3.0, anomaly_agreement=agreement
    )
    anomaly_map = np.full((4, 4, 1), score, np.float32)
    return postprocess(
        np.array([0.05, 0.9, 0.05]), np.zeros((4, 4), np.float32), (8, 8), policy, anomaly_map
    )


@pytest.mark.parametrize("agreement", [False, True])
def test_a_confident_defect_answer_the_score_does_not_flag_is_uncertain_only_with_agreement(
    agreement,
):
    answer = _answer(score=1.0, agreement=agreement)
    assert answer.label == "crack" and answer.confidence == pytest.approx(0.9)
    assert answer.status == (UNCERTAIN if agreement else ACCEPTED)
    # The score flagging the defect answer agrees with it: accepted either way.
    assert _answer(score=5.0, agreement=agreement).status == ACCEPTED


def test_agreement_needs_an_anomaly_threshold_and_a_score():
    policy = DecisionPolicy(CLASSES, 0.5, confidence_threshold=0.6, anomaly_agreement=True)
    answer = postprocess(np.array([0.05, 0.9, 0.05]), np.zeros((4, 4), np.float32), (8, 8), policy)
    assert answer.status == ACCEPTED


def test_a_good_answer_the_score_flags_stays_an_unknown_defect():
    policy = DecisionPolicy(CLASSES, 0.5, anomaly_threshold=3.0, anomaly_agreement=True)
    answer = postprocess(
        np.array([0.9, 0.05, 0.05]),
        np.zeros((4, 4), np.float32),
        (8, 8),
        policy,
        np.full((4, 4, 1), 5.0, np.float32),
    )
    assert answer.label == UNKNOWN_DEFECT and answer.status == UNCERTAIN
