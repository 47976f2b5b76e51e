"""Symbolic answer equivalence (math-verify/sympy) in persistent worker processes, with a hard deadline.

It exists because sympy may run for minutes or exhaust memory on a pathological answer, and
signal-based timeouts work only on the main thread: a small pool of worker processes runs
math-verify/sympy with its own signal timeouts disabled, the caller waits on a pipe with a
deadline and kills the worker when it passes, so checks are bounded in time from any thread (gRPC
handler pools) and run concurrently; `signal.alarm` is never used in the caller. A symbolic check
costs ~7 ms p50 / ~35 ms p95 (a pipe round trip + sympy); definite results are cached. Spawning
subprocesses (not fork) keeps it safe in threaded servers. alphamath.answer hands over here only
what its string/numeric fast path cannot decide.
Knobs: ALPHAMATH_ANSWER_WORKERS (default min(2, cpus)), ALPHAMATH_ANSWER_QUEUE_TIMEOUT_S (wait for
a free worker, 60), ALPHAMATH_ANSWER_START_TIMEOUT_S (worker import, 60),
ALPHAMATH_ANSWER_WORKER_MEM_MB (address-space cap per worker, 2048; 0 = none).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time

__all__ = ["symbolic_equiv", "warmup", "shutdown"]

log = logging.getLogger(__name__)

_ENV_WORKERS = "ALPHAMATH_ANSWER_WORKERS"
_ENV_QUEUE_TIMEOUT = "ALPHAMATH_ANSWER_QUEUE_TIMEOUT_S"
_ENV_START_TIMEOUT = "ALPHAMATH_ANSWER_START_TIMEOUT_S"
_ENV_WORKER_MEM = "ALPHAMATH_ANSWER_WORKER_MEM_MB"


class _Outcome:
    EQUAL, UNEQUAL, TIMEOUT, ERROR, BUSY = "equal", "unequal", "timeout", "error", "busy"


class _SymbolicWorker:
    """One `python -m alphamath.symbolic` child speaking JSON lines over pipes.

    Used by one thread at a time (the pool hands it out). On a missed deadline the child is
    killed and a fresh one spawned at once, so sympy never runs past a caller's deadline."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._ready = False
        self._seq = 0

    def _spawn(self) -> None:
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("OMP_NUM_THREADS", "1")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "alphamath.symbolic"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            env=env,
            close_fds=True,
        )
        self._buf, self._ready = b"", False

    def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.kill()
            proc.wait(timeout=5)
        except Exception:  # noqa: BLE001
            pass
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass

    def _readline(self, deadline: float) -> bytes:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            poller = select.poll()  # not select(): fds past 1024 are common in gRPC servers
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            if not poller.poll(max(0, int(remaining * 1000))):
                if time.monotonic() >= deadline:
                    raise TimeoutError
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError("answer worker exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def ready_now(self) -> bool:
        """Whether the worker has finished its imports, without waiting for it."""
        if self._ready:
            return True
        if self._proc is None or self._proc.poll() is not None:
            return False
        try:
            self.ensure_ready(0.0)
        except Exception:  # noqa: BLE001 - not ready yet, or broken: check() will deal with it
            return False
        return True

    def ensure_ready(self, start_timeout_s: float) -> None:
        if self._proc is None or self._proc.poll() is not None:
            self.kill()
            self._spawn()
        if not self._ready:
            msg = json.loads(self._readline(time.monotonic() + start_timeout_s))
            if not msg.get("ready"):
                raise RuntimeError(f"unexpected worker greeting {msg!r}")
            self._ready = True

    def check(self, pred: str, truth: str, timeout_s: float, start_timeout_s: float) -> str:
        try:
            self.ensure_ready(start_timeout_s)
            self._seq += 1
            req = json.dumps({"id": self._seq, "pred": pred, "truth": truth}).encode() + b"\n"
            assert self._proc is not None and self._proc.stdin is not None
            self._proc.stdin.write(req)
            self._proc.stdin.flush()
            deadline = time.monotonic() + timeout_s
            while True:
                msg = json.loads(self._readline(deadline))
                if msg.get("id") == self._seq:
                    break
            if msg.get("error"):
                log.debug("symbolic check failed: %s", msg["error"])
                return _Outcome.ERROR
            return _Outcome.EQUAL if msg.get("equal") else _Outcome.UNEQUAL
        except TimeoutError:
            log.warning("answer check timed out after %.1fs: pred=%.80r truth=%.80r", timeout_s, pred, truth)
            self.kill()
            self._safe_respawn()
            return _Outcome.TIMEOUT
        except Exception as e:  # noqa: BLE001 - a broken worker is "not equal", then replaced
            log.warning("answer worker failed (%s); restarting it", e)
            self.kill()
            self._safe_respawn()
            return _Outcome.ERROR

    def _safe_respawn(self) -> None:
        """Start the replacement now so its imports overlap with the caller's other work."""
        try:
            self._spawn()
        except Exception as e:  # noqa: BLE001
            log.error("could not respawn answer worker: %s", e)
            self._proc = None


class _WorkerPool:
    """Idle workers handed out one per check; a ready one is preferred over one still
    importing sympy after a restart, so a timeout elsewhere does not delay this check."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"{_ENV_WORKERS} must be >= 1, got {size}")
        self.size = size
        self.pid = os.getpid()
        self._all = [_SymbolicWorker() for _ in range(size)]
        self._idle = list(self._all)
        self._cond = threading.Condition()
        self.queue_timeout_s = float(os.environ.get(_ENV_QUEUE_TIMEOUT, "60"))
        self.start_timeout_s = float(os.environ.get(_ENV_START_TIMEOUT, "60"))

    def _acquire(self, timeout_s: float) -> _SymbolicWorker | None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self._idle:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            worker = next((w for w in reversed(self._idle) if w.ready_now()), self._idle[-1])
            self._idle.remove(worker)
            return worker

    def _release(self, worker: _SymbolicWorker) -> None:
        with self._cond:
            self._idle.append(worker)
            self._cond.notify()

    def check(self, pred: str, truth: str, timeout_s: float) -> str:
        w = self._acquire(self.queue_timeout_s)
        if w is None:
            log.warning("no answer worker free within %.0fs", self.queue_timeout_s)
            return _Outcome.BUSY
        try:
            return w.check(pred, truth, timeout_s, self.start_timeout_s)
        finally:
            self._release(w)

    def warmup(self) -> None:
        taken: list[_SymbolicWorker] = []
        try:
            for _ in range(self.size):
                w = self._acquire(self.queue_timeout_s)
                if w is None:
                    raise TimeoutError("answer workers stayed busy during warmup")
                taken.append(w)
            for w in taken:  # spawn all first so their imports run in parallel
                if w._proc is None:
                    w._spawn()
            for w in taken:
                w.ensure_ready(self.start_timeout_s)
        finally:
            for w in taken:
                self._release(w)

    def shutdown(self) -> None:
        for w in self._all:
            w.kill()


_POOL: _WorkerPool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _WorkerPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():  # a forked child must not share pipes
            _POOL = _WorkerPool(int(os.environ.get(_ENV_WORKERS, str(min(2, os.cpu_count() or 1)))))
        return _POOL


def warmup() -> None:
    """Start the symbolic workers now (services call this at start-up so the first check of
    an unusual answer does not pay the ~1 s sympy import)."""
    _pool().warmup()


def shutdown() -> None:
    """Kill the worker processes (also run at interpreter exit)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and _POOL.pid == os.getpid():
            _POOL.shutdown()
        _POOL = None


atexit.register(shutdown)


_SYM_CACHE: dict[tuple[str, str], bool] = {}
_SYM_CACHE_MAX = 16384
_SYM_CACHE_LOCK = threading.Lock()


def symbolic_equiv(pred: str, truth: str, timeout_s: float) -> tuple[bool, str]:
    """Whether two normalised answers are equal by math-verify, and how that was decided: "cached",
    "symbolic", "timeout", "error" or "busy" (no free worker). Anything but a definite answer is False."""
    key = (pred, truth)
    with _SYM_CACHE_LOCK:
        hit = _SYM_CACHE.get(key)
    if hit is not None:
        return hit, "cached"
    outcome = _pool().check(pred, truth, timeout_s)
    if outcome in (_Outcome.EQUAL, _Outcome.UNEQUAL):  # only definite answers are cached
        with _SYM_CACHE_LOCK:
            if len(_SYM_CACHE) >= _SYM_CACHE_MAX:
                _SYM_CACHE.clear()
            _SYM_CACHE[key] = outcome == _Outcome.EQUAL
    return outcome == _Outcome.EQUAL, {"equal": "symbolic", "unequal": "symbolic"}.get(outcome, outcome)


# ----------------------------------------------------------------------------------------
# Worker process side
# ----------------------------------------------------------------------------------------


def _serve() -> None:
    """Worker loop: JSON lines in on stdin, JSON lines out on a private copy of stdout.

    fd 1 is pointed at stderr so a stray print inside sympy cannot corrupt the protocol.
    math-verify's own signal timeouts are off: the parent enforces the deadline by killing us.
    """
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    # Cap the address space so a pathological answer dies of MemoryError (-> "not equal")
    # before the deadline instead of pushing the node into swap or the OOM killer.
    mem_mb = int(os.environ.get(_ENV_WORKER_MEM, "2048"))
    if mem_mb > 0:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (mem_mb << 20, mem_mb << 20))
    sys.setrecursionlimit(10000)
    logging.basicConfig(level=logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    import math_verify.grader as _grader
    import math_verify.parser as _parser

    _grader.TIMEOUT_WARNING_SHOWN = True  # our deadline is enforced by the parent
    _parser.TIMEOUT_WARNING_SHOWN = True
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    def check(pred: str, truth: str) -> bool:
        gold = parse("$" + truth + "$", extraction_config=config, parsing_timeout=None)
        target = parse("$" + pred + "$", extraction_config=config, parsing_timeout=None)
        if not gold or not target:
            return False
        return bool(verify(gold, target, timeout_seconds=None))

    check("1", "1")  # pay the first-call import/caching cost before announcing readiness
    out.write(json.dumps({"ready": True}) + "\n")
    for raw in sys.stdin.buffer:
        try:
            req = json.loads(raw)
        except ValueError:
            continue
        try:
            resp = {"id": req.get("id"), "equal": check(str(req["pred"]), str(req["truth"]))}
        except BaseException as e:  # noqa: BLE001 - RecursionError, MemoryError, sympy bugs
            if isinstance(e, KeyboardInterrupt):
                raise
            resp = {"id": req.get("id"), "equal": False, "error": f"{type(e).__name__}: {e}"[:500]}
        out.write(json.dumps(resp) + "\n")


if __name__ == "__main__":
    _serve()
