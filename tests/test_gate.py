import math

import pytest
from omegaconf import OmegaConf

from defectflow.gate import GateFailed, decide, require_pass

METRICS = {"accuracy": 0.9, "presence_accuracy": 0.95, "defect_dice": 0.4}


def _gate(**kw):
    base = {"min_accuracy": 0.8, "min_presence_accuracy": 0.9, "min_defect_dice": 0.3}
    return OmegaConf.create({**base, **kw})


def test_passes_when_all_thresholds_met():
    decision = decide(METRICS, _gate())
    assert decision.passed
    require_pass(decision)
    assert "gate passed" in decision.message()
    assert "| accuracy | 0.9000 | 0.8000 | yes |" in decision.markdown()


def test_fails_with_every_reason():
    decision = decide(METRICS, _gate(min_accuracy=0.95, min_defect_dice=0.5))
    assert not decision.passed
    with pytest.raises(GateFailed) as err:
        require_pass(decision)
    text = str(err.value)
    assert "accuracy = 0.9000 < 0.9500" in text
    assert "defect_dice = 0.4000 < 0.5000" in text
    assert "presence_accuracy" not in text


def test_nan_metric_fails_a_positive_threshold():
    metrics = {**METRICS, "defect_dice": math.nan}
    assert not decide(metrics, _gate()).passed
    assert decide(metrics, _gate(min_defect_dice=0.0)).passed
