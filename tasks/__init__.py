"""Prefect tasks (installed as `defectflow.orchestration.tasks`): each wraps a function of the
packages below thinly (arguments in, a result and a Prefect artifact out) and holds no logic.

May import: Prefect and any defectflow package but the CLI.
"""
