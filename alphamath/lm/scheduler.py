"""Continuous batching for LocalLM.generate: admission of waiting requests at step boundaries, the decode loop.

It exists so that generate() calls from many threads (concurrent searches, RPC handlers) share every
forward pass: a call queues a request, requests with the same sampling settings join the running
batch when the batch has room, and the loop runs on a calling thread, never a thread of its own.

One thread computes: libgomp gives every thread that runs a parallel region its own OpenMP pool, and once
a process holds more pool threads than cores it cuts spinning to ~100 turns, so every parallel region of
every decode step then sleeps and wakes its threads through futexes. One other thread that had run a single
parallel torch op made batch-1 steps 1.4x slower (16.6 -> 23.9 ms) and 48-row steps 47.6 -> 67.6 ms (s42,
AMX Xeon), for the life of the process. So while a thread serves decode loops (`serve`), every LocalLM's
other model work (score, features) from other threads is handed to it (`_on_serving_thread`) and runs
between its steps.
"""
from __future__ import annotations

import hashlib
import threading
from collections import deque
from concurrent.futures import Future

import torch

from alphamath.lm.kv import _Batch, _Decoding, _Request, _Row, slab_slots
from alphamath.lm.lock import COMPUTE
from alphamath.lm.lookup import DRAFT_MAX

DEFAULT_MAX_BATCH_ROWS = 128  # samples decoded at once
# The KV of the running batch (its distinct prompts, and rows x (width + room) own slots) is
# bounded by the memory budget (alphamath/lm/budget.py); joining copies it once more. Without a bound,
# 16 concurrent MCTS searches (80 rows of ~2k-token prompts, fp32) grew past 24 GB and were OOM-killed.


def _sample_seed(seed: int, k: int, prompt: str) -> int:
    """Seed of sample k of `prompt`: independent of which other requests share the batch."""
    digest = hashlib.sha256(f"{seed}:{k}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _Serving:
    """The thread serving decode loops in this process, if any, and model work handed to it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.host: "Scheduler | None" = None  # the LocalLM whose serve() runs on `thread`
        self.thread: int | None = None
        self.calls: deque = deque()  # (fn, Future)

    def run_calls(self) -> None:
        """Run the work handed over so far (on the serving thread, between decode steps)."""
        while True:
            with self.lock:
                if not self.calls:
                    return
                fn, fut = self.calls.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - the error belongs to the caller
                    fut.set_exception(e)
                    if isinstance(e, (KeyboardInterrupt, SystemExit)):
                        raise


_SERVING = _Serving()


class Scheduler:
    """The decode loop and admission of LocalLM (which mixes this in). The host owns the state used
    here: `_queue`, `_cv`, `_batch`, `_leading`, `lock`, `cache`, `device`, the batch limits,
    `_prompt_tiles`, `_root`, and `_lookup`, `_extend` and `encode`."""

    def _wait_or_lead(self, req: _Request) -> None:
        """Wait for `req`, running the decode loop whenever no other thread is running it.

        The loop runs on a calling thread, not a thread of its own: a second thread doing torch work
        gets its own OpenMP pool, and with more OpenMP threads than cores libgomp cuts spinning to a
        few hundred turns, which made every decode step ~1.6x slower. A caller leads until its own
        request is done, then hands the batch to a waiting caller, so nothing is left running when
        nobody waits (a reloaded model holds no thread)."""
        while True:
            with self._cv:
                while not req.done.is_set() and self._leading:
                    self._cv.wait()
                if req.done.is_set():
                    return
                self._leading = True
            try:
                self._lead(req.done.is_set, req)
            finally:
                with self._cv:
                    self._leading = False
                    self._cv.notify_all()

    def serve(self, until) -> None:
        """Run the decode loop on this thread, for generate() calls made on other threads, until
        `until()` is true. A program that searches (or serves RPCs) on worker threads calls this on
        its main thread, so every decode step runs on one thread and one OpenMP pool (see
        `_wait_or_lead`); so does every LocalLM's other model work meanwhile (`_on_serving_thread`).
        On return, waiting callers lead again."""
        with self._cv:
            while self._leading:
                self._cv.wait()
            self._leading = True
        with _SERVING.lock:
            if _SERVING.host is not None:
                with self._cv:
                    self._leading = False
                    self._cv.notify_all()
                raise RuntimeError("another thread already serves decode loops in this process")
            _SERVING.host, _SERVING.thread = self, threading.get_ident()
        try:
            while not until():
                _SERVING.run_calls()
                with self._cv:
                    if self._batch is None and not self._queue:
                        if not _SERVING.calls:
                            self._cv.wait(0.05)
                        continue
                self._lead(lambda: self._batch is None and not self._queue, None)
        finally:
            with _SERVING.lock:
                _SERVING.host = _SERVING.thread = None
            _SERVING.run_calls()  # handed over before the host left: nobody else would run them
            with self._cv:
                self._leading = False
                self._cv.notify_all()

    def _on_serving_thread(self, fn):
        """fn() on the thread serving decode loops, if another thread does (see the module doc), else here."""
        with _SERVING.lock:
            host = _SERVING.host
            if host is None or _SERVING.thread == threading.get_ident():
                fut = None
            else:
                fut = Future()
                _SERVING.calls.append((fn, fut))
        if fut is None:
            return fn()
        with host._cv:
            host._cv.notify_all()
        return fut.result()

    def _lead(self, done, mine: _Request | None) -> None:
        """The decode loop: admits waiting requests at step boundaries and runs one step at a time
        until `done()`; the batch stays in `self._batch` for the next leader."""
        serving = _SERVING.thread == threading.get_ident()
        while not done():
            if serving:
                _SERVING.run_calls()
            with self._cv:
                admit = self._admissible(self._batch)
            waiting = set(admit) | {smp.request for smp in (self._batch.samples if self._batch else [])}
            try:
                with self.lock, COMPUTE, torch.inference_mode():
                    if admit:
                        self._batch = self._admit(self._batch, admit)
                    if not self._batch.step(self):
                        self._batch = None
            except BaseException as e:  # noqa: BLE001 - the error belongs to the callers
                batch, self._batch = self._batch, None
                failed = {smp.request for smp in (batch.samples if batch else [])} | set(admit)
                for req in failed | ({mine} if mine is not None else set()):
                    if not req.done.is_set():
                        req.error = e
                        req.done.set()
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
            if any(req.done.is_set() for req in waiting):
                with self._cv:  # wake callers whose requests this step finished; a step that finished none wakes
                    self._cv.notify_all()  # nobody (16 searches' threads had woken every step, to wait again)

    def _admissible(self, batch: "_Batch | None") -> list[_Request]:
        """Requests to start now (called under _cv). A running batch admits requests with its key when
        they add a quarter of its rows or have waited 8 steps (each admission copies the rows' own columns),
        and none once a request with another key waits: the batch then drains, so that one starts."""
        if not self._queue:
            return []
        key = batch.key if batch is not None else self._queue[0].key
        same = [r for r in self._queue if r.key == key]
        if not same or (batch is not None and len(same) < len(self._queue)):
            return []
        if batch is not None:
            for r in same:
                r.waited += 1
            rows = sum(r.rows for r in same)
            if 4 * rows < batch.size and max(r.waited for r in same) < 8:
                return []
        admit, rows = [], batch.size if batch is not None else 0
        width = batch.width if batch is not None else 0
        groups, plen = (batch.live_prompts, batch.prompt_len) if batch is not None else (0, 0)
        for r in same:  # an empty batch takes its first request whatever its size
            # KV slots: the prompt slab (each distinct prompt once, padded, with room; twice with
            # prompt_tiles), and each row's own columns (padded to the widest row) with room for max_new_tokens
            # (and a draft's columns).
            g, p = groups + len(r.prompts), max([plen] + [len(t) for t in r.prompts])
            slots = (1 + self._prompt_tiles) * slab_slots(batch, g, p) + (rows + r.rows) * (width + key[3] + DRAFT_MAX)
            kv_bytes = slots * self._kv_bytes_per_slot
            if (rows + r.rows > self.max_batch_rows or kv_bytes > self.max_batch_kv_bytes) and (admit or batch is not None):
                break
            admit.append(r)
            rows, groups, plen = rows + r.rows, g, p
        for r in admit:
            self._queue.remove(r)
        return admit

    def _admit(self, batch: "_Batch | None", reqs: list[_Request]) -> "_Batch":
        """Prefill the requests' prompts (only what the prefix cache lacks) and add their samples."""
        stop, temperature, _, max_new_tokens = reqs[0].key
        distinct: dict[tuple, _Row] = {}  # a prompt two requests share is computed once
        for req in reqs:
            for t in req.prompts:
                if tuple(t) not in distinct:
                    distinct[tuple(t)] = self._lookup(t, need_logits=True)
        self._extend(list(distinct.values()))  # one prefill for all admitted requests
        for r in distinct.values():
            self.cache.insert(r.tokens, r.kv, r.values)
        rows_of = [[distinct[tuple(t)] for t in req.prompts] for req in reqs]
        new = []
        for req, rows in zip(reqs, rows_of):
            for j, (pi, sd) in enumerate(req.pairs):
                for k in range(req.per_pair):
                    gen = None
                    if temperature > 0:
                        gen = torch.Generator(device=self.device).manual_seed(_sample_seed(sd, k, req.texts[pi]))
                    req.samples.append(_Decoding(rows[pi], k, gen, req, j))
            req.left = len(req.samples)
            new.extend(req.samples)
        # its root: the prefix every cached sequence shares, the admitted prompts included
        root = self.cache.branch_length(reqs[0].prompts[0]) if self._root else 0
        if batch is None:
            batch = _Batch(reqs[0].key, max((len(self.encode(st)) for st in stop), default=0) + 4,
                           self._prompt_tiles, root)
        batch.add(new, max_new_tokens, self.device, root)
        for r in distinct.values():  # copied into the batch: do not hold a second copy per prompt
            r.kv = r.past = r.past_values = None
        return batch
