"""Prefect flows of defectflow: each composes tasks from tasks/ and nothing else."""
