"""Timing shared by the benchmark scripts (run as `python benchmarks/<script>.py`, which puts
this folder on the import path)."""

from __future__ import annotations

import time


def take_turns(calls: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """ms per call of each named `calls[name]()`, after `warmup` calls of each, the names
    alternating order every repeat, so a load change on the shared machine affects them alike."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            start = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - start) * 1000)
    return times
