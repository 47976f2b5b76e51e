"""Dynamic batching: requests from many concurrent searches share one model forward.

Requests are gathered for a short window (a few ms) after the oldest one arrives, or until the
batch is full, then run together on one worker thread (the model runs one batch at a time).
Only requests with the same key (generation parameters) are batched together. The queue is
bounded: a full queue rejects at once (the servers answer RESOURCE_EXHAUSTED), so overload
shows up as fast errors the clients can back off on, not as unbounded latency.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

from alphamath.service import Overloaded, Unavailable

log = logging.getLogger(__name__)


class BatcherClosed(Unavailable):
    """The batcher was shut down."""


@dataclass
class _Item:
    key: Hashable
    payload: Any
    size: int
    future: Future
    enqueued: float = field(default_factory=time.monotonic)


# fn(key, payloads) -> one result per payload, in order.
BatchFn = Callable[[Hashable, list], Sequence]


class Batcher:
    """Gathers submitted payloads into batches for `fn`.

    size: a payload's cost in batch slots (e.g. prompts x n sequences); a batch holds at most
    `max_batch_size` slots (a single larger payload runs alone). `max_queue` bounds waiting
    requests. `on_batch(size, seconds)` and the `depth_gauge` feed the service's metrics.
    """

    def __init__(self, fn: BatchFn, *, max_batch_size: int = 64, window_s: float = 0.005,
                 max_queue: int = 256, name: str = "batcher", depth_gauge=None,
                 on_batch: Callable[[int, float], None] | None = None, workers: int = 1):
        if max_batch_size < 1 or max_queue < 1 or window_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and window_s >= 0")
        self.fn, self.max_batch_size, self.window_s, self.max_queue = fn, max_batch_size, window_s, max_queue
        self.name, self.depth_gauge, self.on_batch = name, depth_gauge, on_batch
        self._pending: deque[_Item] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.batches = 0  # number of batches run (for tests and logs)
        self._lock = threading.Lock()
        # Several workers keep several batches in flight: TGI and LocalLM both merge concurrent calls
        # into the batch they are decoding (continuous batching).
        self._workers = [threading.Thread(target=self._run, name=f"{name}-worker-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for w in self._workers:
            w.start()

    # ------------------------------------------------------------ client side

    def submit(self, key: Hashable, payload: Any, size: int = 1) -> Future:
        """Queue one request; its Future resolves to fn's result for it. Raises Overloaded when the queue is full."""
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise BatcherClosed(f"{self.name} is shut down")
            if len(self._pending) >= self.max_queue:
                raise Overloaded(f"{self.name} queue is full ({self.max_queue} requests waiting)")
            self._pending.append(_Item(key, payload, max(1, size), fut))
            self._set_depth()
            self._cv.notify()
        return fut

    def __call__(self, key: Hashable, payload: Any, size: int = 1, timeout: float | None = None,
                 on_cancel: Callable[[Callable[[], Any]], Any] | None = None):
        """submit() and wait for the result; a timeout cancels the request if it has not started.
        `on_cancel(cancel)` hands the request's cancel to its caller (gRPC: `context.add_callback`)."""
        fut = self.submit(key, payload, size)
        if on_cancel is not None:
            on_cancel(fut.cancel)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    @property
    def depth(self) -> int:
        return len(self._pending)

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop accepting; fail what is still queued; wait for the running batch."""
        with self._cv:
            self._closed = True
            leftover = list(self._pending)
            self._pending.clear()
            self._set_depth()
            self._cv.notify_all()
        for item in leftover:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(BatcherClosed(f"{self.name} is shut down"))
        for w in self._workers:
            w.join(timeout)

    # ------------------------------------------------------------ worker side

    def _set_depth(self) -> None:
        if self.depth_gauge is not None:
            self.depth_gauge.set(len(self._pending))

    def _take_batch(self) -> list[_Item]:
        """Block until a batch is ready: the oldest request's window closed or the batch is full.

        Safe with several workers: each wait is followed by a fresh look at the queue.
        """
        with self._cv:
            while True:
                if self._closed:
                    return []
                if not self._pending:
                    self._cv.wait()
                    continue
                first = self._pending[0]
                same = sum(it.size for it in self._pending if it.key == first.key)
                left = first.enqueued + self.window_s - time.monotonic()
                if same < self.max_batch_size and left > 0:
                    self._cv.wait(left)
                    continue
                batch, slots, keep = [], 0, deque()
                for it in self._pending:
                    if it.key == first.key and (not batch or slots + it.size <= self.max_batch_size):
                        batch.append(it)
                        slots += it.size
                    else:
                        keep.append(it)
                self._pending = keep
                self._set_depth()
                if self._pending:
                    self._cv.notify()  # another worker may start on what is left
                return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            live = [it for it in batch if it.future.set_running_or_notify_cancel()]  # skip cancelled
            if not live:
                continue
            start = time.perf_counter()
            try:
                results = list(self.fn(live[0].key, [it.payload for it in live]))
                if len(results) != len(live):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(live)} requests")
            except BaseException as e:  # noqa: BLE001 - the error belongs to the callers
                log.exception("batch failed", extra={"batcher": self.name, "requests": len(live)})
                for it in live:
                    it.future.set_exception(e)
                continue
            finally:
                with self._lock:
                    self.batches += 1
                if self.on_batch is not None:
                    self.on_batch(sum(it.size for it in live), time.perf_counter() - start)
            for it, r in zip(live, results):
                it.future.set_result(r)
