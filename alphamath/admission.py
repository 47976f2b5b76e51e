"""One admission gate for every server: at most `max_active` requests run, at most `max_queued` wait,
the rest are refused with `Overloaded` (RESOURCE_EXHAUSTED), so a burst queues a bounded amount of
work instead of growing memory until the OOM killer stops the pod.

Search holds a slot per search, the sandbox one per execution. A waiting caller polls its own
`check()` (deadline passed, client gone) every 50 ms, so no slot is ever handed to a dead request.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable

from alphamath.service import Overloaded

POLL_S = 0.05


class Admission:
    """`what` names the unit in the refusal ("search is overloaded: 4 searches running ...")."""

    def __init__(self, service: str, what: str, max_active: int, max_queued: int, queued_gauge, active_gauge):
        self.service, self.what = service, what
        self.max_active, self.max_queued = max_active, max_queued
        self._slots = threading.Semaphore(max_active)
        self._lock = threading.Lock()
        self._queued, self._active = queued_gauge, active_gauge
        self.waiting = 0
        self.running = 0  # requests holding a slot (tests wait on this instead of sleeping)

    @contextmanager
    def slot(self, check: Callable[[], None] = lambda: None, bounded: bool = True, deadline: float | None = None):
        """Hold a slot. `check()` raises to give up waiting (deadline, cancellation); `bounded=False`
        waits without counting against the queue bound (workers whose number is bounded elsewhere).
        With a `deadline` (time.monotonic()) no wait runs past it, so a slot that frees up after the
        deadline never starts the request; `check()` then says why it gives up."""
        if not self._slots.acquire(blocking=False):
            with self._lock:
                if bounded and self.waiting >= self.max_queued:
                    raise Overloaded(f"{self.service} is overloaded: {self.max_active} {self.what} running and "
                                     f"{self.waiting} waiting (limit {self.max_queued}); retry later")
                self.waiting += 1
                self._queued.inc()
            try:
                while not self._slots.acquire(timeout=_wait(deadline)):
                    check()
            finally:
                with self._lock:
                    self.waiting -= 1
                    self._queued.dec()
        with self._lock:
            self.running += 1
        self._active.inc()
        try:
            yield
        finally:
            self._active.dec()
            with self._lock:
                self.running -= 1
            self._slots.release()


def _wait(deadline: float | None) -> float:
    return POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
