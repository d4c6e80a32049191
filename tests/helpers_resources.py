"""Skipping a test for something the machine lacks (a container engine, Chromium, the real
data) is allowed only where DEFECTFLOW_ALLOW_MISSING says so; anywhere else, CI included, the
test fails with the reason. conftest.py lists, at the end of each run, what ran and what skipped."""

from __future__ import annotations

import os

import pytest

ALLOW_MISSING_ENV = "DEFECTFLOW_ALLOW_MISSING"
#: The fixture that provides each kind of resource, and the kind's name.
RESOURCE_FIXTURES = {
    "container_engine": "container",
    "browser_binary": "browser",
    "capsule_root": "real_data",
    "pill_root": "real_data",
}
KINDS = frozenset(RESOURCE_FIXTURES.values())


def allowed_missing() -> set[str]:
    """The kinds DEFECTFLOW_ALLOW_MISSING allows to skip ("all" for every kind)."""
    named = {
        part.strip() for part in os.environ.get(ALLOW_MISSING_ENV, "").split(",") if part.strip()
    }
    unknown = named - KINDS - {"all"}
    if unknown:
        raise pytest.UsageError(
            f"{ALLOW_MISSING_ENV}: unknown kind(s) {sorted(unknown)}; known: {sorted(KINDS)} or all"
        )
    return set(KINDS) if "all" in named else named


def skip_missing(kind: str, reason: str) -> None:
    """Skip the test when `kind` may be missing here, else fail it; either way say why."""
    assert kind in KINDS, kind
    message = f"missing {kind}: {reason}"
    print(message)
    if kind in allowed_missing():
        pytest.skip(message)
    pytest.fail(
        f"{message}\n(on a machine without it, {ALLOW_MISSING_ENV}={kind} turns this failure into a skip)",
        pytrace=False,
    )
