"""Evaluation: judging a model artifact, never changing one.

Here: every figure, defined once (`metrics`), the thresholds and temperature chosen on the
validation split (`calibration`), evaluation through the serving path (`evaluate`), the stored
model re-evaluated beside production (`champion`), the promotion gate (`gate`), the charts
(`plots`), the HTML report (`report`, from `templates/`), mean ± std over runs (`results`) and
what production answered lately beside its validation answers (`drift`).

May import: data, inference and the foundations; scikit-learn, SciPy, matplotlib, Jinja2.
Never training, serving, orchestration or the CLI.
"""
