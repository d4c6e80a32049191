"""Drift: what production answered lately, beside what its model answered on its validation split.

The service logs one JSON line per answer (`serve.prediction_log`, written by service.py from
`defectflow.serving.settings.prediction_record`): the class answered, its confidence, its status
(accepted or uncertain) and, with an anomaly head, the anomaly score. The production model
answers the validation split of the run that trained it again here, through the same predictor,
and three things are compared over the last `drift.window_hours`:

* class mix: the share of answers per class (`unknown_defect` included), by the population
  stability index (PSI), tested by chi-square on the two samples' counts;
* anomaly scores: the two distributions, by the two-sample Kolmogorov-Smirnov statistic and test;
* uncertain rate: the share of uncertain answers, by its change, tested by Fisher's exact test.

A check marks drift when its effect reaches its threshold (`drift.class_psi`, `drift.score_ks`,
`drift.uncertain_rate_change`) and its p-value is at most `drift.max_p_value`; below
`drift.min_predictions` answers it shows the figures and judges nothing. The reference is the
model's own answers, not the true labels: what the line produces can be seen to change before
anyone has labelled it. Only answers of the production model count (the log names the model of
each), and a window without any says so and compares nothing.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from defectflow.evaluation.plots import (
    DPI,
    FONT_SIZE,
    GRAY,
    SERIES_COLORS,
    figure_to_rgb,
    new_figure,
    save_rgb,
)
from defectflow.inference.postprocessing import UNCERTAIN, UNKNOWN_DEFECT

#: The time format of `json_log_line` (local time with its UTC offset).
LOG_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"
#: Verdicts of a check.
DRIFT, NO_DRIFT, TOO_FEW, UNAVAILABLE = "drift", "no drift", "too few answers", "not available"
#: Added to every class count of the PSI, so that a class one side never answered stays finite.
PSEUDO_COUNT = 0.5
REFERENCE, PRODUCTION = "validation (reference)", "production"


# ---------------------------------------------------------------- the prediction log


@dataclass
class LogWindow:
    """The answers of one model in a time window of the prediction log, and what was left out."""

    path: str
    start: datetime
    end: datetime
    #: {"class", "answer_status", "anomaly_score"} of each answer in the window, in log order.
    answers: list[dict] = field(default_factory=list)
    exists: bool = True
    #: Lines that are not a JSON object with a readable time (skipped, counted).
    malformed: int = 0
    #: Prediction requests in the window that got no answer (refused uploads, 4xx/503).
    refused: int = 0
    #: Answers in the window by other models (a model served before a promotion, a pinned tag).
    other_models: dict[str, int] = field(default_factory=dict)

    @property
    def hours(self) -> float:
        return (self.end - self.start).total_seconds() / 3600.0


def _answer(record: dict) -> dict:
    score = record.get("anomaly_score")
    return {
        "class": str(record["class"]),
        "answer_status": str(record.get("answer_status", "accepted")),
        "anomaly_score": None if score is None else float(score),
    }


def read_prediction_log(
    path: str | Path, start: datetime, end: datetime, model: str | None = None
) -> LogWindow:
    """The answers logged in `path` from `start` (inclusive) to `end` (exclusive), by `model`
    only when given; a missing file is an empty window (`exists` False)."""
    window = LogWindow(str(path), start, end)
    path = Path(path)
    if not path.is_file():
        window.exists = False
        return window
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                when = datetime.strptime(record["time"], LOG_TIME_FORMAT)
            except (ValueError, KeyError, TypeError):
                window.malformed += 1
                continue
            if record.get("event") != "prediction" or not start <= when < end:
                continue
            if "class" not in record:
                window.refused += 1
            elif model is not None and record.get("model") != model:
                other = str(record.get("model"))
                window.other_models[other] = window.other_models.get(other, 0) + 1
            else:
                window.answers.append(_answer(record))
    return window


def answers_of(predictions) -> list[dict]:
    """`Prediction`s as the log records their answers."""
    return [
        {"class": p.label, "answer_status": p.status, "anomaly_score": p.anomaly_score}
        for p in predictions
    ]


def validation_answers(model_dir: str | Path, samples, batch_size: int = 8) -> list[dict]:
    """The model in `model_dir` answering `samples` through the serving code path (its serving
    format, its thresholds), a batch of images in memory at a time."""
    from defectflow.inference.predictor import Predictor
    from defectflow.inference.preprocessing import read_image

    predictor = Predictor.load(model_dir)
    answers: list[dict] = []
    for begin in range(0, len(samples), batch_size):
        images = [read_image(s.path) for s in samples[begin : begin + batch_size]]
        answers += answers_of(predictor.predict_arrays(images, batch_size))
    return answers


# ---------------------------------------------------------------- the statistics


@dataclass
class Check:
    """One comparison: its figures on both sides, its statistic and test, and the verdict."""

    name: str
    statistic: str
    threshold: float
    reference: str = ""
    production: str = ""
    value: float | None = None
    p_value: float | None = None
    verdict: str = UNAVAILABLE
    note: str = ""

    @property
    def drifted(self) -> bool:
        return self.verdict == DRIFT

    def value_text(self) -> str:
        if self.value is None:
            return ""
        sign = "+" if self.statistic == "change" and self.value > 0 else ""
        return f"{self.statistic} {sign}{self.value:.3f}"


def check_settings(cfg) -> None:
    """ValueError unless the `drift` section's numbers make sense."""
    if not cfg.window_hours > 0:
        raise ValueError(f"drift.window_hours must be > 0, got {cfg.window_hours}")
    if cfg.min_predictions < 1:
        raise ValueError(f"drift.min_predictions must be >= 1, got {cfg.min_predictions}")
    for key in ("class_psi", "score_ks", "uncertain_rate_change"):
        if not getattr(cfg, key) >= 0:
            raise ValueError(f"drift.{key} must be >= 0, got {getattr(cfg, key)}")
    if not 0.0 < cfg.max_p_value <= 1.0:
        raise ValueError(f"drift.max_p_value must be in (0, 1], got {cfg.max_p_value}")


def _verdict(check: Check, n: int, cfg) -> Check:
    if n < cfg.min_predictions:
        check.verdict = TOO_FEW
        check.note = f"{n} in the window, fewer than drift.min_predictions={cfg.min_predictions}"
    elif check.value is not None and check.p_value is not None:
        big = abs(check.value) >= check.threshold
        check.verdict = DRIFT if big and check.p_value <= cfg.max_p_value else NO_DRIFT
    return check


def population_stability_index(reference_counts, production_counts) -> float:
    """PSI = sum over classes of (p - r) * ln(p / r), the shares r and p taken with
    `PSEUDO_COUNT` added to every count. Under 0.1: little change; over 0.25: a large one."""
    r = np.asarray(reference_counts, np.float64) + PSEUDO_COUNT
    p = np.asarray(production_counts, np.float64) + PSEUDO_COUNT
    r, p = r / r.sum(), p / p.sum()
    return float(np.sum((p - r) * np.log(p / r)))


def _shares_text(counts: dict[str, int]) -> str:
    n = sum(counts.values())
    shown = ", ".join(f"{k} {v / n:.0%}" for k, v in counts.items() if v)
    return f"{shown} (n={n})"


def compare_class_mix(
    reference: list[str], production: list[str], cfg, categories: list[str] | None = None
) -> Check:
    """The share of answers per class: PSI, and chi-square on the 2 x classes count table."""
    check = Check("class mix", "PSI", float(cfg.class_psi))
    if not reference:
        check.note = "no reference answers"
        return check
    seen = [*(categories or []), *sorted(set(reference) | set(production))]
    categories = list(dict.fromkeys(seen))
    ref = Counter(reference)
    prod = Counter(production)
    ref_counts = [ref[c] for c in categories]
    prod_counts = [prod[c] for c in categories]
    check.reference = _shares_text(dict(zip(categories, ref_counts, strict=True)))
    check.production = _shares_text(dict(zip(categories, prod_counts, strict=True)))
    if not production:
        return _verdict(check, 0, cfg)
    check.value = population_stability_index(ref_counts, prod_counts)
    table = np.array([ref_counts, prod_counts])
    table = table[:, table.sum(axis=0) > 0]
    check.p_value = (
        float(stats.chi2_contingency(table).pvalue) if table.shape[1] > 1 else 1.0
    )  # one class on both sides: nothing moved
    return _verdict(check, len(production), cfg)


def _scores_text(scores: np.ndarray) -> str:
    q1, median, q3 = np.percentile(scores, [25, 50, 75])
    return f"median {median:.4g}, quartiles {q1:.4g}-{q3:.4g} (n={scores.size})"


def compare_scores(reference: list[float], production: list[float], cfg) -> Check:
    """The anomaly-score distributions: two-sample Kolmogorov-Smirnov statistic and test."""
    check = Check("anomaly score", "KS", float(cfg.score_ks))
    ref = np.asarray(reference, np.float64)
    prod = np.asarray(production, np.float64)
    if not ref.size:
        check.note = "the production model has no anomaly score"
        return check
    check.reference = _scores_text(ref)
    if not prod.size:
        check.note = "the logged answers carry no anomaly score"
        return check
    check.production = _scores_text(prod)
    result = stats.ks_2samp(ref, prod)
    check.value, check.p_value = float(result.statistic), float(result.pvalue)
    return _verdict(check, int(prod.size), cfg)


def _rate_text(uncertain: int, n: int) -> str:
    return f"{uncertain / n:.1%} ({uncertain} of {n})" if n else ""


def compare_uncertain_rate(reference: list[str], production: list[str], cfg) -> Check:
    """The share of uncertain answers: its change (production - reference) and Fisher's exact
    test on the 2 x 2 table."""
    check = Check("uncertain rate", "change", float(cfg.uncertain_rate_change))
    if not reference:
        check.note = "no reference answers"
        return check
    ref_u = sum(s == UNCERTAIN for s in reference)
    prod_u = sum(s == UNCERTAIN for s in production)
    check.reference = _rate_text(ref_u, len(reference))
    check.production = _rate_text(prod_u, len(production))
    if not production:
        return _verdict(check, 0, cfg)
    check.value = prod_u / len(production) - ref_u / len(reference)
    table = [[ref_u, len(reference) - ref_u], [prod_u, len(production) - prod_u]]
    check.p_value = float(stats.fisher_exact(table).pvalue)
    return _verdict(check, len(production), cfg)


def compare(
    reference: list[dict], production: list[dict], cfg, categories: list[str] | None = None
) -> list[Check]:
    """The three checks of production's answers against the reference answers (both as
    `read_prediction_log` and `answers_of` give them)."""
    check_settings(cfg)

    def scores(answers):
        return [a["anomaly_score"] for a in answers if a.get("anomaly_score") is not None]

    return [
        compare_class_mix(
            [a["class"] for a in reference], [a["class"] for a in production], cfg, categories
        ),
        compare_scores(scores(reference), scores(production), cfg),
        compare_uncertain_rate(
            [a["answer_status"] for a in reference], [a["answer_status"] for a in production], cfg
        ),
    ]


# ---------------------------------------------------------------- the report


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass
class DriftReport:
    """The checks of one window, or why there are none (`note`)."""

    model: str | None
    window: LogWindow | None = None
    reference_source: str = ""
    checks: list[Check] = field(default_factory=list)
    note: str = ""
    classes: list[str] = field(default_factory=list)
    reference: list[dict] = field(default_factory=list)

    @property
    def answers(self) -> list[dict]:
        return self.window.answers if self.window else []

    @property
    def drifted(self) -> list[str]:
        return [c.name for c in self.checks if c.drifted]

    def headline(self) -> str:
        if self.note and not self.checks:
            return self.note.split(":")[0]
        if not self.answers:
            return f"no answers logged in the last {self.window.hours:g} h"
        if self.drifted:
            return "drift in " + ", ".join(self.drifted)
        judged = [c for c in self.checks if c.verdict in (DRIFT, NO_DRIFT)]
        return (
            "no drift"
            if judged
            else "not judged: " + "; ".join(f"{c.name} {c.verdict}" for c in self.checks)
        )

    def _window_text(self) -> str:
        w = self.window
        return (
            f"answers of production model `{self.model}` logged from {_when(w.start)} to "
            f"{_when(w.end)} (the last {w.hours:g} h) in `{w.path}`"
        )

    def _left_out(self) -> list[str]:
        w, out = self.window, []
        if w is None:
            return out
        if w.other_models:
            models = ", ".join(f"`{k}` {v}" for k, v in sorted(w.other_models.items()))
            out.append(f"answers by other models, left out: {models}")
        if w.refused:
            out.append(f"requests refused without an answer: {w.refused}")
        if w.malformed:
            out.append(f"log lines that are not a timed JSON record, skipped: {w.malformed}")
        return out

    def markdown(self) -> str:
        lines = [f"## Drift: {self.headline()}", ""]
        if self.window is None or (self.note and not self.checks):
            lines.append(self.note)
            return "\n".join(lines)
        if not self.answers:
            where = "" if self.window.exists else " (the file does not exist yet)"
            lines.append(
                f"No answer of production model `{self.model}` was logged from "
                f"{_when(self.window.start)} to {_when(self.window.end)} (the last "
                f"{self.window.hours:g} h) in `{self.window.path}`{where}: nothing to compare."
            )
        else:
            lines += [
                f"Compared: {len(self.answers)} {self._window_text()}, with {self.reference_source}.",
                "",
                "| check | reference | production | statistic | threshold | p-value | verdict |",
                "|---|---|---|---|---|---|---|",
            ]
            for row in self.table_rows():
                lines.append("| " + " | ".join(str(v) for v in row.values()) + " |")
            notes = [f"{c.name}: {c.note}" for c in self.checks if c.note]
            if self.note:
                notes.insert(0, self.note)
            if notes:
                lines += ["", *(f"- {n}" for n in notes)]
        left_out = self._left_out()
        if left_out:
            lines += ["", *(f"- {n}" for n in left_out)]
        return "\n".join(lines)

    def table_rows(self) -> list[dict]:
        if not self.answers:
            return [
                {
                    "check": c,
                    "production": "no answers logged in the window",
                    "verdict": "nothing to compare",
                }
                for c in ("class mix", "anomaly score", "uncertain rate")
            ]
        return [
            {
                "check": c.name,
                "reference": c.reference or "-",
                "production": c.production or "-",
                "statistic": c.value_text() or "-",
                "threshold": f"{c.threshold:g}",
                "p-value": "-" if c.p_value is None else f"{c.p_value:.2g}",
                "verdict": c.verdict,
            }
            for c in self.checks
        ]

    def summary(self) -> dict:
        """What the nightly run returns: the headline and each check's verdict."""
        return {
            "headline": self.headline(),
            "drifted": self.drifted,
            "answers": len(self.answers),
            "checks": {c.name: c.verdict for c in self.checks},
        }

    def to_dict(self) -> dict:
        window = None
        if self.window is not None:
            window = {
                **{k: v for k, v in asdict(self.window).items() if k != "answers"},
                "start": self.window.start.isoformat(),
                "end": self.window.end.isoformat(),
                "answers": len(self.window.answers),
            }
        return {
            "model": self.model,
            "headline": self.headline(),
            "note": self.note,
            "window": window,
            "reference_source": self.reference_source,
            "checks": [asdict(c) for c in self.checks],
        }

    def save(self, out_dir: Path) -> dict[str, Path]:
        """drift.json, drift.md, drift.html and, when there were answers to compare, drift.png."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"json": out_dir / "drift.json", "md": out_dir / "drift.md"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2))
        paths["md"].write_text(self.markdown() + "\n")
        if self.answers and self.reference:
            paths["png"] = save_rgb(drift_image(self), out_dir / "drift.png")
        paths["html"] = out_dir / "drift.html"
        paths["html"].write_text(self.html("drift.png" if "png" in paths else None))
        return paths

    def html(self, chart: str | None = None) -> str:
        """A small page: the headline, what was compared, the table and the chart."""
        e = html.escape
        rows = self.table_rows() if (self.checks or self.window) else []
        head = "".join(f"<th>{e(k)}</th>" for k in (rows[0] if rows else {}))
        body = "".join(
            "<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in row.values()) + "</tr>"
            for row in rows
        )
        text = [
            line.lstrip("- ").replace("`", "")
            for line in self.markdown().splitlines()[1:]
            if line and not line.startswith("|")
        ]
        return (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f"<title>Drift: {e(self.headline())}</title><style>body{{font-family:sans-serif;"
            "margin:2em;max-width:72em}table{border-collapse:collapse}td,th{border:1px solid #bbb;"
            "padding:.3em .6em;text-align:left}</style></head><body>"
            f"<h1>Drift: {e(self.headline())}</h1>"
            + "".join(f"<p>{e(t)}</p>" for t in text)
            + (f"<table><tr>{head}</tr>{body}</table>" if rows else "")
            + (f'<p><img src="{e(chart)}" alt="drift chart"></p>' if chart else "")
            + "</body></html>\n"
        )


# ---------------------------------------------------------------- the chart


def _rgb(color: tuple[int, int, int]) -> tuple[float, float, float]:
    return color[0] / 255, color[1] / 255, color[2] / 255


def _title(check: Check | None, name: str) -> str:
    if check is None:
        return name
    figure = f"{check.value_text()}, " if check.value is not None else ""
    return f"{name}\n{figure}{check.verdict}"


def drift_figure(report: DriftReport, size: tuple[int, int] = (1260, 380)) -> Figure:
    """Class shares, anomaly-score distributions (cumulative) and uncertain rate, the validation
    reference beside production's window, each panel titled with its statistic and verdict."""
    checks = {c.name: c for c in report.checks}
    sides = {REFERENCE: report.reference, PRODUCTION: report.answers}
    colors = {REFERENCE: _rgb(SERIES_COLORS[0]), PRODUCTION: _rgb(SERIES_COLORS[1])}
    fig = new_figure(size[0] / DPI, size[1] / DPI)
    mix, scores, uncertain = fig.subplots(1, 3, width_ratios=(2.2, 1.6, 1.0))

    seen = [*report.classes, *(a["class"] for side in sides.values() for a in side)]
    categories = list(dict.fromkeys(seen))
    x = np.arange(len(categories))
    for j, (label, answers) in enumerate(sides.items()):
        counts = Counter(a["class"] for a in answers)
        shares = [counts[c] / max(len(answers), 1) for c in categories]
        mix.bar(x - 0.2 + 0.4 * j, shares, width=0.38, color=colors[label], label=label)
    mix.set_xticks(x, categories, rotation=30, ha="right", rotation_mode="anchor")
    mix.set(ylim=(0, 1.05), ylabel="share of answers")
    mix.set_title(_title(checks.get("class mix"), "Class mix"), fontsize=FONT_SIZE + 1)
    mix.legend(fontsize=FONT_SIZE - 1)

    drawn = False
    for label, answers in sides.items():
        values = np.sort(
            [a["anomaly_score"] for a in answers if a.get("anomaly_score") is not None]
        )
        if values.size:
            drawn = True
            steps = np.arange(1, values.size + 1) / values.size
            scores.step(values, steps, where="post", color=colors[label], label=label)
    if drawn:
        scores.set(ylim=(0, 1.02), xlabel="anomaly score", ylabel="share at or below")
        scores.legend(fontsize=FONT_SIZE - 1, loc="lower right")
    else:
        scores.set_axis_off()
        scores.text(
            0.5, 0.5, "no anomaly scores", ha="center", va="center", color=_rgb(GRAY),
            transform=scores.transAxes, fontsize=FONT_SIZE + 1,
        )  # fmt: skip
    scores.set_title(_title(checks.get("anomaly score"), "Anomaly scores"), fontsize=FONT_SIZE + 1)

    rates = [
        sum(a["answer_status"] == UNCERTAIN for a in answers) / max(len(answers), 1)
        for answers in sides.values()
    ]
    uncertain.bar([0, 1], rates, color=list(colors.values()))
    uncertain.set_xticks([0, 1], ["reference", "production"])
    uncertain.set(ylim=(0, max(1.05 * max(rates), 0.1)), ylabel="share uncertain")
    uncertain.set_title(
        _title(checks.get("uncertain rate"), "Uncertain answers"), fontsize=FONT_SIZE + 1
    )
    for ax in (mix, scores, uncertain):
        ax.tick_params(labelsize=FONT_SIZE)
        ax.yaxis.label.set_size(FONT_SIZE)
        ax.xaxis.label.set_size(FONT_SIZE)
    return fig


def drift_image(report: DriftReport, size: tuple[int, int] = (1260, 380)) -> np.ndarray:
    """`drift_figure` drawn (RGB uint8)."""
    fig = drift_figure(report, size)
    try:
        return figure_to_rgb(fig)
    finally:
        fig.clear()


# ---------------------------------------------------------------- the production model


def validation_samples(
    metadata: dict, home: str | Path, model_dir: str | Path | None = None
) -> tuple[list, str]:
    """The validation images of the split that trained a stored model (the manifest in its
    folder, else the one of its run, else the stored split of its data version), the ones still
    on disk, and where they came from; ([], why) when there is none."""
    from defectflow.data.split import read_manifest, select

    candidates = [Path(model_dir) / "manifest.csv"] if model_dir else []
    if metadata.get("run_dir"):
        candidates.append(Path(metadata["run_dir"]) / "manifest.csv")
    if metadata.get("data_fingerprint"):
        candidates.append(Path(home) / "manifests" / f"{metadata['data_fingerprint']}.csv")
    for manifest in candidates:
        if manifest.is_file():
            val = select(read_manifest(manifest), "val")
            present = [s for s in val if Path(s.path).is_file()]
            missing = (
                f", {len(val) - len(present)} of its images missing"
                if len(present) < len(val)
                else ""
            )
            if present:
                return present, f"{len(present)} validation images of `{manifest}`{missing}"
            return [], f"no validation image of `{manifest}` is on disk{missing}"
    looked = ", ".join(f"`{c}`" for c in candidates) or "nothing (the model records no run folder)"
    return [], f"no split manifest of the production model (looked for {looked})"


def check_production_drift(cfg, now: datetime | None = None) -> DriftReport:
    """The drift checks of the production model (`package.model_name`) over the last
    `drift.window_hours` of `serve.prediction_log`."""
    from defectflow.artifacts import ModelInfo
    from defectflow.config import resolve_path
    from defectflow.registry import model_metadata, production_tag, verify_model

    check_settings(cfg.drift)
    tag = production_tag(cfg.package.model_name)
    if tag is None:
        return DriftReport(
            None, note=f"no production model: no `{cfg.package.model_name}` model is in production"
        )
    if not cfg.serve.prediction_log:
        return DriftReport(
            tag,
            note="no prediction log: serve.prediction_log is empty, so the service logs to stdout "
            "only and there is nothing to read",
        )
    end = (now or datetime.now(UTC)).astimezone(UTC)
    start = end - timedelta(hours=float(cfg.drift.window_hours))
    window = read_prediction_log(resolve_path(cfg.serve.prediction_log), start, end, tag)
    report = DriftReport(tag, window)
    if not window.answers:
        return report
    model_dir = verify_model(tag)
    report.classes = [*ModelInfo.load(model_dir).classes, UNKNOWN_DEFECT]
    samples, report.reference_source = validation_samples(
        model_metadata(tag), resolve_path(cfg.paths.home), model_dir
    )
    if samples:
        report.reference = validation_answers(model_dir, samples, int(cfg.train.batch_size))
        report.reference_source = f"its own answers on {report.reference_source}"
    else:
        report.note = f"no reference: {report.reference_source}"
    report.checks = compare(report.reference, window.answers, cfg.drift, report.classes)
    return report
