"""Registry actions a person starts from the Prefect UI: re-evaluate a model, change stages."""

from __future__ import annotations

from typing import Literal

from defectflow.orchestration.tasks.evaluation import assess_stored_model
from defectflow.orchestration.tasks.packaging import build_production_bento, change_stage
from prefect import flow
from prefect.states import Completed


@flow(name="evaluate", log_prints=True)
def evaluate(
    model: str | None = None, data_root: str | None = None, overrides: list[str] | None = None
) -> dict:
    """Evaluate a stored model on the test split of a dataset, with the production model beside it.

    Args:
        model: Model tag, e.g. defectflow:abc123 (see `defectflow models list`); empty evaluates production.
        data_root: Dataset folder in MVTec AD layout; empty keeps the data the model was trained on.
        overrides: Extra `key=value` settings over the model's own config, e.g. eval.plot_count=4.

    Read-only on the registry: figures and the report go to <paths.home>/evaluations/.
    """
    settings = [*([f"data.root={data_root}"] if data_root else []), *(overrides or [])]
    return assess_stored_model(model, settings)


@flow(name="promote", log_prints=True)
def promote(
    action: Literal["promote", "rollback", "archive"] = "promote",
    model: str | None = None,
    reason: str = "changed from the Prefect UI",
    build_bento: bool = True,
):
    """Promote a model to production, roll production back to the previous model, or archive a model.

    Args:
        action: promote: MODEL becomes production; rollback: the previous production model returns; archive: MODEL is retired.
        model: Model tag for promote and archive (see `defectflow models list`); ignored by rollback.
        reason: Why, recorded in the registry's history with the user and time.
        build_bento: After promote or rollback, build the Bento of the production model if it has none.
    """
    event = change_stage(action, model, reason)
    bento = build_production_bento() if build_bento and action != "archive" else None
    return Completed(
        message=f"{action}: {event['tag']} (previous production: {event['previous'] or 'none'})",
        data={**event, "bento": bento},
    )
