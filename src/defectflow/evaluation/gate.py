"""The promotion gate: does a new model (challenger) replace the production model (champion)?

Two kinds of check on each gated metric, all recorded with their numbers:
- absolute: the challenger reaches the configured floor (`gate.min_*`);
- champion: the challenger is not worse than the champion by more than `gate.tolerance.*`,
  where the champion was re-evaluated on the same test split in the same run (figures
  stored from another split are not comparable).
With no champion (first run) or a champion that cannot be compared (other classes), the
absolute checks alone decide, and the decision says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

#: gated metric -> the gate config key of its absolute floor
GATED = {
    "accuracy": "min_accuracy",
    "presence_accuracy": "min_presence_accuracy",
    "defect_dice": "min_defect_dice",
}


@dataclass
class GateDecision:
    passed: bool
    checks: list[dict] = field(default_factory=list)
    #: The production model compared with, if any.
    champion: str | None = None
    #: Why the champion took no part, when there is one but it could not be compared.
    champion_note: str | None = None
    #: Set by the caller once the registry has acted on the decision.
    promoted: bool = False
    #: The golden test split compared on: version, size, files left out and why
    #: (`defectflow.data.ledger.GuardedTestSet.to_dict`); None when not recorded.
    test_set: dict | None = None
    #: The same in a sentence, for people.
    test_set_note: str | None = None

    def reasons(self, failed_only: bool = False) -> list[str]:
        out = []
        for c in self.checks:
            if failed_only and c["passed"]:
                continue
            if c["kind"] == "absolute":
                out.append(
                    f"{c['metric']} {c['value']:.4f} {'>=' if c['passed'] else '<'} "
                    f"minimum {c['threshold']:.4f}"
                )
            else:
                out.append(
                    f"{c['metric']} {c['value']:.4f} {'>=' if c['passed'] else '<'} champion "
                    f"{c['champion_value']:.4f} - tolerance {c['tolerance']:.4f}"
                )
        return out

    @property
    def message(self) -> str:
        against = (
            f" against champion {self.champion}"
            if self.champion
            else f" ({self.champion_note})"
            if self.champion_note
            else " (no production model yet: absolute thresholds only)"
        )
        if not self.passed:
            return "not promoted: " + "; ".join(self.reasons(failed_only=True)) + against
        if not self.promoted:
            return (
                "not promoted: gate passed"
                + against
                + ", but promotion is off (gate.promote=false)"
            )
        return "promoted: " + "; ".join(self.reasons()) + against

    def markdown(self) -> str:
        lines = [f"**{self.message}**", ""]
        if self.test_set_note:
            lines += [f"Compared on {self.test_set_note}.", ""]
        lines += [
            "| metric | check | challenger | threshold | champion | tolerance | passed |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in self.checks:
            champion = "" if c["champion_value"] is None else f"{c['champion_value']:.4f}"
            tolerance = "" if c["tolerance"] is None else f"{c['tolerance']:.4f}"
            lines.append(
                f"| {c['metric']} | {c['kind']} | {c['value']:.4f} | {c['threshold']:.4f} | {champion} "
                f"| {tolerance} | {'yes' if c['passed'] else 'NO'} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "message": self.message}


def _at_least(value: float, threshold: float) -> bool:
    # A metric that could not be computed (NaN) passes only a floor that asks nothing.
    return value >= threshold - 1e-12 if not math.isnan(value) else threshold <= 0


def decide(
    metrics: dict,
    gate_cfg,
    champion_metrics: dict | None = None,
    champion: str | None = None,
    champion_note: str | None = None,
) -> GateDecision:
    """The challenger's test `metrics` against the floors and, when given, the champion's."""
    checks = []
    for metric, key in GATED.items():
        value = float(metrics[metric])
        floor = float(gate_cfg[key])
        checks.append(
            {
                "metric": metric,
                "kind": "absolute",
                "value": value,
                "threshold": floor,
                "champion_value": None,
                "tolerance": None,
                "passed": _at_least(value, floor),
            }
        )
    if champion_metrics is not None:
        for metric in GATED:
            value = float(metrics[metric])
            best = float(champion_metrics[metric])
            tolerance = float(gate_cfg.tolerance[metric])
            threshold = best - tolerance
            # A champion figure that is NaN sets no bar.
            passed = True if math.isnan(best) else _at_least(value, threshold)
            checks.append(
                {
                    "metric": metric,
                    "kind": "champion",
                    "value": value,
                    "threshold": threshold,
                    "champion_value": best,
                    "tolerance": tolerance,
                    "passed": passed,
                }
            )
    return GateDecision(
        passed=all(c["passed"] for c in checks),
        checks=checks,
        champion=champion if champion_metrics is not None else None,
        champion_note=champion_note,
    )
