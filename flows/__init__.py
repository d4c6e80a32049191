"""Prefect flows (installed as `defectflow.orchestration.flows`): each composes tasks and
nothing else.

May import: Prefect, `defectflow.orchestration.tasks`, and the config and registry to resolve
what a run works on.
"""
