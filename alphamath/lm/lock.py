"""A re-entrant lock granted in arrival order, guarding LocalLM's model, prefix cache and tokenizer.

It exists because LocalLM's decode loop takes the model lock again right after every step: with a
plain lock the releasing thread usually wins, and a score() or tokenizer call from another thread
would wait for the whole batch to drain.
"""
from __future__ import annotations

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
