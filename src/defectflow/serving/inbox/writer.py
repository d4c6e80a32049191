"""`InboxWriter`: adds items from a background thread, so a prediction never waits for a disk."""

from __future__ import annotations

import logging
import queue
import threading
import time as _time
from collections.abc import Callable

import numpy as np

from defectflow.serving.inbox.store import AddResult, InboxStore

log = logging.getLogger("defectflow.serving.inbox")


class InboxWriter:
    """Adds items from a background thread, so a prediction never waits for a disk.

    `submit` only queues (bounded by count and bytes); when the queue is full the item is
    refused and counted (`refused_busy`). `on_result` is called with each AddResult."""

    def __init__(
        self,
        inbox: InboxStore,
        max_queue: int = 32,
        max_queue_bytes: int = 256_000_000,
        on_result: Callable[[AddResult], None] | None = None,
    ) -> None:
        self.inbox = inbox
        self.max_queue = int(max_queue)
        self.max_queue_bytes = int(max_queue_bytes)
        self.on_result = on_result
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._queued_bytes = 0
        self._queued = 0
        self.refused_busy = 0
        self.callback_errors = 0
        self._thread = threading.Thread(target=self._run, name="defectflow-inbox", daemon=True)
        self._thread.start()

    def submit(
        self, image: bytes | np.ndarray, answer: dict, model_tag: str, time: float | None = None
    ) -> bool:
        size = (
            len(image) if isinstance(image, (bytes, bytearray)) else int(np.asarray(image).nbytes)
        )
        with self._lock:
            if self._queued >= self.max_queue or self._queued_bytes + size > self.max_queue_bytes:
                self.refused_busy += 1
                return False
            self._queued += 1
            self._queued_bytes += size
        self._queue.put(
            (image, answer, model_tag, time if time is not None else _time.time(), size)
        )
        return True

    def _run(self) -> None:
        while True:
            image, answer, model_tag, created, size = self._queue.get()
            try:
                result = self.inbox.add(image, answer, model_tag, created)
                if self.on_result is not None:
                    self.on_result(result)
            except Exception:  # noqa: BLE001 - the thread must keep going
                self.callback_errors += 1
                log.exception("inbox writer: an item's result could not be handled")
            finally:
                with self._lock:
                    self._queued -= 1
                    self._queued_bytes -= size
                self._queue.task_done()

    def join(self, timeout: float = 30.0) -> bool:
        """Wait until the queue is empty; False when `timeout` passed first."""
        deadline = _time.monotonic() + timeout
        while _time.monotonic() < deadline:
            with self._lock:
                if self._queued == 0:
                    return True
            _time.sleep(0.01)
        return False

    @property
    def counters(self) -> dict[str, int]:
        return {**self.inbox.counters, "refused_busy": self.refused_busy}
