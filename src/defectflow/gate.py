"""The evaluation gate: a model is packaged only when it reaches the configured thresholds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: gate config key -> metric it bounds from below
THRESHOLDS = {
    "min_accuracy": "accuracy",
    "min_presence_accuracy": "presence_accuracy",
    "min_defect_dice": "defect_dice",
}


class GateFailed(RuntimeError):
    """A model did not reach a threshold; the message lists every reason."""


@dataclass
class GateDecision:
    passed: bool
    checks: list[dict] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        return [
            f"{c['metric']} = {c['value']:.4f} {'>=' if c['passed'] else '<'} {c['threshold']:.4f}"
            for c in self.checks
        ]

    def message(self) -> str:
        failed = [r for r, c in zip(self.reasons, self.checks, strict=True) if not c["passed"]]
        if self.passed:
            return "gate passed: " + "; ".join(self.reasons)
        return "gate failed: " + "; ".join(failed)

    def markdown(self) -> str:
        lines = ["| metric | value | threshold | passed |", "|---|---|---|---|"]
        lines += [
            f"| {c['metric']} | {c['value']:.4f} | {c['threshold']:.4f} | {'yes' if c['passed'] else 'NO'} |"
            for c in self.checks
        ]
        return "\n".join(lines)


def decide(metrics: dict, gate_cfg) -> GateDecision:
    checks = []
    for key, metric in THRESHOLDS.items():
        threshold = float(gate_cfg[key])
        value = float(metrics[metric])
        # A metric that could not be computed (NaN) never passes a non-zero threshold.
        passed = value >= threshold if not math.isnan(value) else threshold <= 0
        checks.append({"metric": metric, "value": value, "threshold": threshold, "passed": passed})
    return GateDecision(all(c["passed"] for c in checks), checks)


def require_pass(decision: GateDecision) -> None:
    if not decision.passed:
        raise GateFailed(decision.message())
