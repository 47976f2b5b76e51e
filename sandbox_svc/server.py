"""SandboxService: the gVisor executor behind gRPC, with bounded concurrency and per-request limits.

Each Execute runs in the handler thread (the executor blocks on a sandbox subprocess, so threads
overlap fine). A semaphore bounds how many sandboxes run at once (each is a gVisor sandbox with
its own memory budget, so this is what keeps the node inside its memory); requests beyond that
wait in a bounded queue, and beyond the queue they are refused with RESOURCE_EXHAUSTED so that
search backs off instead of piling up. A request whose deadline passes while it waits gets
DEADLINE_EXCEEDED without running.

Which backend runs the code is never hidden: it is in every ExecuteResponse, the Info RPC, the
startup log and the metrics (`alphamath_sandbox_backend_info`, and the `backend` label of
`alphamath_sandbox_executions_total`). Teardowns finish in the background and are counted in
`alphamath_sandbox_teardowns_total{backend,outcome}`.

Per-request limits (`ExecLimits`) can only tighten the server's limits, never loosen them:
unset fields take the server's values and larger values are clamped to them. The wall-clock
timeout and the output cap are applied per request; the memory limit is the one the (pre-booted)
sandboxes were started with, i.e. the server's maximum.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager

import grpc
from prometheus_client import Counter, Gauge, Histogram

from alphamath.pb import sandbox_pb2, sandbox_pb2_grpc
from alphamath.service import (LATENCY_BUCKETS, GrpcServer, ServiceMetrics, parse_config,
                               run_until_signal, service_parser, setup_logging)

log = logging.getLogger("sandbox_svc")

MAX_CELLS = 256


class QueueFull(RuntimeError):
    pass


class _Gate:
    """At most `max_concurrency` executions; at most `max_queue` waiting; the rest refused."""

    def __init__(self, max_concurrency: int, max_queue: int, queued_gauge: Gauge, active_gauge: Gauge):
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self._sem = threading.Semaphore(max_concurrency)
        self._lock = threading.Lock()
        self.waiting = 0
        self._queued, self._active = queued_gauge, active_gauge

    @contextmanager
    def slot(self, deadline: float | None, is_active=lambda: True):
        if not self._sem.acquire(blocking=False):
            with self._lock:
                if self.waiting >= self.max_queue:
                    raise QueueFull(f"sandbox is overloaded: {self.max_concurrency} executions running and "
                                    f"{self.waiting} waiting (limit {self.max_queue}); retry later")
                self.waiting += 1
                self._queued.inc()
            try:
                while True:
                    wait = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                    if wait <= 0:
                        raise TimeoutError("the deadline passed while waiting for a free sandbox")
                    if self._sem.acquire(timeout=wait):
                        break
                    if not is_active():
                        raise ConnectionAbortedError("the client went away while waiting")
            finally:
                with self._lock:
                    self.waiting -= 1
                    self._queued.dec()
        self._active.inc()
        try:
            yield
        finally:
            self._active.dec()
            self._sem.release()


class SandboxServicer(sandbox_pb2_grpc.SandboxServiceServicer):
    """Execute over any object with `execute(cells) -> ExecResult` and a `limits` attribute
    (sandbox_svc.executor.Executor). If the executor's `execute` accepts `timeout_s` /
    `max_output_bytes` keywords, per-request tightening is passed through to it."""

    def __init__(self, executor, *, max_concurrency: int = 4, max_queue: int = 32,
                 metrics: ServiceMetrics | None = None):
        self.executor = executor
        lim = executor.limits
        self.max_timeout_s = float(lim.timeout_s)
        self.max_memory_bytes = int(lim.memory_bytes)
        self.max_output_chars = int(lim.max_output_bytes)
        self.max_code_bytes = int(lim.max_code_bytes)
        max_parallel = getattr(executor, "max_parallel", None)
        if max_parallel and max_concurrency > max_parallel:
            log.info("backend %s runs %d execution(s) at a time: max_concurrency %d -> %d",
                     getattr(executor, "backend", "?"), max_parallel, max_concurrency, max_parallel)
            max_concurrency = max_parallel
        params = inspect.signature(executor.execute).parameters
        self._per_call = {k for k in ("timeout_s", "max_output_bytes") if k in params}
        base = metrics or ServiceMetrics("sandbox")
        r = base.registry
        info = executor.info() if hasattr(executor, "info") else {"backend": getattr(executor, "backend", "unknown")}
        self.info = info
        self.backend = str(info["backend"])
        backend_gauge = Gauge("alphamath_sandbox_backend_info", "the sandbox backend in use (value 1)",
                              ["backend", "strength", "production"], registry=r)
        backend_gauge.labels(self.backend, str(info.get("strength", "unknown")),
                             str(bool(info.get("production"))).lower()).set(1)
        self.m_exec = Counter("alphamath_sandbox_executions", "executions by backend and outcome",
                              ["backend", "outcome"], registry=r)
        self.m_teardown = Counter("alphamath_sandbox_teardowns", "background sandbox teardowns by outcome "
                                  "(slow: over 2 s; failed: a step timed out or errored)", ["backend", "outcome"],
                                  registry=r)
        self.m_teardown_seconds = Histogram("alphamath_sandbox_teardown_seconds", "wall time of one teardown",
                                            buckets=LATENCY_BUCKETS, registry=r)
        if hasattr(executor, "on_teardown"):
            executor.on_teardown = self._teardown_done
        self.m_seconds = Histogram("alphamath_sandbox_execution_seconds", "wall time of one execution",
                                   buckets=LATENCY_BUCKETS, registry=r)
        active = Gauge("alphamath_sandbox_active", "sandboxes running now", registry=r)
        self.gate = _Gate(max_concurrency, max_queue, base.queue_depth("sandbox"), active)

    def _limits(self, req: sandbox_pb2.ExecuteRequest, context) -> tuple[float, int]:
        """(timeout_s, max_output_chars) of this request: the request's values clamped to the server's."""
        lim = req.limits
        timeout, out_chars = self.max_timeout_s, self.max_output_chars
        if lim.HasField("timeout_s"):
            if not lim.timeout_s > 0:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"limits.timeout_s must be > 0, got {lim.timeout_s}")
            timeout = min(timeout, lim.timeout_s)
        if lim.HasField("memory_bytes") and lim.memory_bytes == 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limits.memory_bytes must be > 0")
        if lim.HasField("max_output_chars"):
            out_chars = min(out_chars, lim.max_output_chars)
        rem = context.time_remaining()
        if rem is not None:
            timeout = min(timeout, rem)
        return timeout, out_chars

    def _teardown_done(self, backend: str, outcome: str, seconds: float) -> None:
        self.m_teardown.labels(backend, outcome).inc()
        self.m_teardown_seconds.observe(seconds)

    def Info(self, request, context):
        return sandbox_pb2.SandboxInfo(backend=self.backend, strength=str(self.info.get("strength", "")),
                                       production=bool(self.info.get("production")),
                                       pool_size=int(self.info.get("pool_size", 0)), timeout_s=self.max_timeout_s,
                                       memory_bytes=self.max_memory_bytes, max_output_chars=self.max_output_chars,
                                       max_code_bytes=self.max_code_bytes,
                                       max_concurrency=self.gate.max_concurrency)

    def Execute(self, request, context):
        cells = list(request.cells)
        if len(cells) > MAX_CELLS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{len(cells)} cells; the limit is {MAX_CELLS}")
        size = sum(len(c.encode("utf-8", "surrogatepass")) for c in cells)
        if size > self.max_code_bytes:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"code is {size} bytes in {len(cells)} cells; the limit is {self.max_code_bytes} bytes")
        timeout, out_chars = self._limits(request, context)
        rem = context.time_remaining()
        deadline = None if rem is None else time.monotonic() + rem
        kwargs = {}
        if "timeout_s" in self._per_call:
            kwargs["timeout_s"] = timeout
        if "max_output_bytes" in self._per_call:
            kwargs["max_output_bytes"] = out_chars
        try:
            with self.gate.slot(deadline, context.is_active):
                result = self.executor.execute(cells, **kwargs)
        except QueueFull as e:
            self.m_exec.labels(self.backend, "overloaded").inc()
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except TimeoutError as e:
            self.m_exec.labels(self.backend, "deadline").inc()
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        except ConnectionAbortedError as e:
            context.abort(grpc.StatusCode.CANCELLED, str(e))
        except (ValueError, TypeError) as e:
            self.m_exec.labels(self.backend, "invalid").inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:  # noqa: BLE001 - a sandbox that failed to boot: transient, retryable
            self.m_exec.labels(self.backend, "sandbox_error").inc()
            log.error("sandbox failed: %s", e)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"sandbox could not run the code: {e}")
        stdout = result.stdout
        if len(stdout) > out_chars:
            stdout = stdout[:out_chars] + "\n...[output truncated]"
        self.m_exec.labels(self.backend, "timeout" if result.timed_out else "error" if result.error else "ok").inc()
        self.m_seconds.observe(result.duration_s)
        resp = sandbox_pb2.ExecuteResponse(stdout=stdout, timed_out=result.timed_out, duration_s=result.duration_s,
                                           backend=getattr(result, "backend", None) or self.backend)
        if result.error is not None:
            resp.error = result.error
        return resp


class SandboxServer:
    """A running sandbox service: gRPC (with health, reflection) plus its /metrics endpoint."""

    def __init__(self, executor, *, port: int = 0, host: str = "127.0.0.1", metrics_port: int = -1,
                 max_concurrency: int = 4, max_queue: int = 32, max_workers: int = 0, own_executor: bool = False,
                 uds: str | None = None):
        """`uds`: also listen on this Unix socket (how the pod-shaped gVisor test reaches the service)."""
        self.executor, self.own_executor = executor, own_executor
        self.metrics = ServiceMetrics("sandbox")
        self.servicer = SandboxServicer(executor, max_concurrency=max_concurrency, max_queue=max_queue,
                                        metrics=self.metrics)
        name = sandbox_pb2.DESCRIPTOR.services_by_name["SandboxService"].full_name
        workers = max(max_workers, max_concurrency + max_queue + 8)

        def register(server):
            sandbox_pb2_grpc.add_SandboxServiceServicer_to_server(self.servicer, server)
            if uds and not server.add_insecure_port(f"unix:{uds}"):
                raise OSError(f"cannot listen on unix:{uds}")

        self.grpc = GrpcServer(register, [name], port=port, host=host, metrics=self.metrics, max_workers=workers)
        self.port = self.grpc.port
        self.metrics_port = self.metrics.serve(metrics_port, host) if metrics_port >= 0 else None

    def stop(self, grace: float | None = 5.0) -> None:
        self.grpc.stop(grace)
        self.metrics.stop()
        if self.own_executor:
            self.executor.close()


def parser():
    p = service_parser("sandbox", "SandboxService: runs model-written Python in gVisor sandboxes.")
    p.add_argument("--backend", default="auto", choices=["auto", "pod", "runsc", "bwrap"],
                   help="sandbox backend: pod (inside a gVisor pod), runsc (gVisor on a host), bwrap (weaker, "
                        "needs --allow-weak-backend); auto picks pod or runsc, never a weaker one")
    p.add_argument("--allow-weak-backend", action="store_true",
                   help="allow a backend weaker than gVisor (bwrap); off in production")
    p.add_argument("--uds", default="", help="also listen on this Unix socket path")
    p.add_argument("--scratch-dir", default="", help="pod backend: where per-execution scratch directories go")
    p.add_argument("--preload", default="",
                   help="modules pooled sandboxes import ahead of their request (comma-separated; '' for none)")
    p.add_argument("--environment-scrubbed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--max-concurrency", type=int, default=4, help="sandboxes running at once")
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting; beyond this RESOURCE_EXHAUSTED")
    p.add_argument("--pool-size", type=int, default=2, help="sandboxes booted ahead of time (warm pool)")
    p.add_argument("--timeout-s", type=float, default=5.0, help="wall-clock limit per execution (server maximum)")
    p.add_argument("--memory-mb", type=int, default=256, help="memory limit per execution (server maximum)")
    p.add_argument("--max-output-chars", type=int, default=1024, help="stdout kept per execution (server maximum)")
    p.add_argument("--max-code-bytes", type=int, default=64 << 10, help="largest accepted code (all cells)")
    return p


def _reexec_without_environment(p: argparse.ArgumentParser, args: argparse.Namespace):
    """Restart this process with its configuration as flags and an EMPTY environment.

    In the pod the model's code runs as our uid, and gVisor lets it read /proc/<our pid>/environ
    (even of a non-dumpable process): nothing of the pod's environment may be left there."""
    argv = [sys.executable, "-I", "-u", "-B", "-m", "sandbox_svc"]  # -I: no cwd on the import path
    for action in p._actions:
        if not action.option_strings or action.dest in ("help", "_service", "environment_scrubbed"):
            continue
        value = getattr(args, action.dest)
        if isinstance(action, argparse._StoreTrueAction):
            argv += [action.option_strings[0]] if value else []
        elif value is not None:
            argv += [action.option_strings[0], str(value)]
    os.execve(sys.executable, [*argv, "--environment-scrubbed"], {})


def main(argv=None) -> int:
    p = parser()
    args = parse_config(p, argv)
    from sandbox_svc.executor import running_in_gvisor

    pod = args.backend == "pod" or (args.backend == "auto" and running_in_gvisor())
    if pod and os.environ and not args.environment_scrubbed:
        _reexec_without_environment(p, args)
    setup_logging("sandbox", args.log_level)
    if args.max_concurrency < 1 or args.max_queue < 0:
        raise SystemExit("--max-concurrency must be >= 1 and --max-queue >= 0")
    from sandbox_svc.executor import STRONG_BACKENDS, Executor

    executor = Executor(memory_mb=args.memory_mb, timeout_s=args.timeout_s, max_output_bytes=args.max_output_chars,
                        max_code_bytes=args.max_code_bytes, backend=args.backend, allow_weak=args.allow_weak_backend,
                        pool_size=args.pool_size, scratch_dir=args.scratch_dir or None,
                        preload=tuple(m for m in args.preload.split(",") if m) if args.pool_size else ())
    server = SandboxServer(executor, port=args.port, host=args.host, metrics_port=args.metrics_port,
                           max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                           max_workers=args.max_workers, own_executor=True, uds=args.uds or None)
    if args.uds and executor.backend == "pod":
        # Model code runs as our uid: it must not replace or remove the socket clients connect to
        # (and cannot chmod the directory back: the runner's seccomp filter denies chmod).
        os.chmod(os.path.dirname(os.path.abspath(args.uds)), 0o555)
    level = logging.INFO if executor.backend in STRONG_BACKENDS else logging.WARNING
    log.log(level, "sandbox service ready, backend %s (%s)", executor.backend, executor.strength,
            extra={"port": server.port, "metrics_port": server.metrics_port, "backend": executor.backend,
                   "strength": executor.strength, "pool_size": args.pool_size})
    run_until_signal(server.stop, log)
    return 0
