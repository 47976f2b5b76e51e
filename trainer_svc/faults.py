"""Deterministic crash points for the kill-and-restart tests.

ALPHAMATH_FAULT_KILL_AT="<point>:<n>" makes the process SIGKILL itself the n-th time it reaches
`fault_point("<point>")`. Unset (always, outside tests) it costs one dict lookup.
"""
from __future__ import annotations

import os
import signal
import sys

FAULT_ENV = "ALPHAMATH_FAULT_KILL_AT"
_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
