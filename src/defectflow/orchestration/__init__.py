"""Orchestration: the only package that imports Prefect.

Here: the flows and their tasks (the repository's `flows/` and `tasks/` folders, installed as
`defectflow.orchestration.flows` and `defectflow.orchestration.tasks`), run folders (`runs`)
and the local stack of Prefect server, work pools and workers (`stack`) with its PostgreSQL
(`postgres`). Tasks wrap the logic of the packages below thinly; flows only compose tasks.

May import: everything below it (training, evaluation, data, inference, models, serving's
settings, the registry), Prefect, and for the stack the Docker SDK (prefect-docker's) and
asyncpg (prefect's). Never the CLI.
"""
