"""Locks around LocalLM: a re-entrant lock granted in arrival order, guarding its model, prefix cache and
tokenizer (`_FairLock`), and the machine's model compute, one process at a time (`COMPUTE`).

The first exists because LocalLM's decode loop takes the model lock again right after every step: with a
plain lock the releasing thread usually wins, and a score() or tokenizer call from another thread
would wait for the whole batch to drain.
"""
from __future__ import annotations

import fcntl
import os
import threading


class _FairLock:
    """A re-entrant lock granted in arrival order. The decode loop takes the model lock again right
    after every step; with a plain lock the thread releasing it usually wins the race, so a score()
    or a tokenizer call from another thread could wait for the whole batch to drain."""

    def __init__(self):
        self._cv = threading.Condition(threading.Lock())
        self._next = self._serving = 0
        self._owner: int | None = None
        self._depth = 0

    def __enter__(self):
        me = threading.get_ident()
        with self._cv:
            if self._owner == me:
                self._depth += 1
                return self
            ticket, self._next = self._next, self._next + 1
            while self._serving != ticket:
                self._cv.wait()
            self._owner, self._depth = me, 1
        return self

    def __exit__(self, *exc):
        with self._cv:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._serving += 1
                self._cv.notify_all()


class _ComputeLock:
    """Model compute, one process at a time among those given the same file (ALPHAMATH_COMPUTE_LOCK: an
    flock), re-entrant within a process; a no-op where the variable is unset (a pod has its own CPUs).

    The local stack runs the policy and the value services as two processes on the same cores, each with an
    OpenMP pool of one thread per core. When both computed at once, each parallel region waited for threads
    the other process had descheduled: the stack solved 19-27% fewer problems a minute than the in-process
    engine at concurrency 4 and 16 (s46, Zen 4), where one thread runs every forward in turn
    (scheduler.py). Taken around each decode step and each prefill, the lock gives the stack the same
    turns. The file is opened on first use, so a process started without it never touches the disk; a process
    that dies holding the lock releases it (the kernel drops an flock with its last descriptor)."""

    def __init__(self):
        self._lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None
        self._path: str | None = None

    def __enter__(self):
        self._lock.acquire()
        try:
            if self._depth == 0:
                path = os.environ.get("ALPHAMATH_COMPUTE_LOCK") or None
                if path != self._path:
                    if self._fd is not None:
                        os.close(self._fd)
                    self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600) if path else None
                    self._path = path
                if self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._depth += 1
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc):
        try:
            self._depth -= 1
            if self._depth == 0 and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._lock.release()


COMPUTE = _ComputeLock()
