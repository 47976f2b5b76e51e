"""SandboxService: the gVisor executor behind gRPC, with bounded concurrency and per-request limits.

Each Execute runs in the handler thread (the executor blocks on a sandbox subprocess, so threads
overlap fine). The admission gate (alphamath.admission) bounds how many sandboxes run at once
(each is a gVisor sandbox with its own memory budget, so this is what keeps the node inside its
memory); requests beyond that wait in a bounded queue, and beyond the queue they are refused with
RESOURCE_EXHAUSTED so that search backs off instead of piling up. A request whose deadline passes
while it waits gets DEADLINE_EXCEEDED without running.

Which backend runs the code is never hidden: it is in every ExecuteResponse, the Info RPC, the
startup log and the metrics (`alphamath_sandbox_backend_info`, and the `backend` label of
`alphamath_sandbox_executions_total`). Teardowns finish in the background and are counted in
`alphamath_sandbox_teardowns_total{backend,outcome}`.

Per-request limits (`ExecLimits`) can only tighten the server's limits, never loosen them:
unset fields take the server's values and larger values are clamped to them. The wall-clock
timeout and the output cap are applied per request; the memory limit is the one the (pre-booted)
sandboxes were started with, i.e. the server's maximum.

`python -m sandbox_svc` (sandbox_svc/__main__.py) is the command line that starts it.
"""
from __future__ import annotations

import inspect
import logging
import time

import grpc
from prometheus_client import Counter, Gauge, Histogram

from alphamath.admission import Admission
from alphamath.pb import sandbox_pb2, sandbox_pb2_grpc
from alphamath.service import (LATENCY_BUCKETS, GrpcServer, Overloaded, RequestCancelled, RequestDeadlineExceeded,
                               ServiceMetrics, Unavailable, status_for)

log = logging.getLogger("sandbox_svc")

MAX_CELLS = 256


# how an Execute that did not run counts in alphamath_sandbox_executions_total (a cancelled one does not)
OUTCOMES = ((Overloaded, "overloaded"), (RequestDeadlineExceeded, "deadline"), (ValueError, "invalid"),
            (Unavailable, "sandbox_error"))


class SandboxServicer(sandbox_pb2_grpc.SandboxServiceServicer):
    """Execute over any object with `execute(cells) -> ExecResult` and a `limits` attribute
    (alphamath.sandbox.executor.Executor). If the executor's `execute` accepts `timeout_s` /
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
        self.gate = Admission("sandbox", "executions", max_concurrency, max_queue,
                              base.queue_depth("sandbox"), active)

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
                                       max_concurrency=self.gate.max_active)

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

        def check():
            """Give up waiting for a free sandbox once the deadline passed or the client left."""
            if deadline is not None and time.monotonic() >= deadline:
                raise RequestDeadlineExceeded("the deadline passed while waiting for a free sandbox")
            if not context.is_active():
                raise RequestCancelled("the client went away while waiting")

        try:
            with self.gate.slot(check, deadline=deadline):
                result = self.executor.execute(cells, **kwargs)
        except Exception as e:  # noqa: BLE001 - every failure answers through the one status map
            if isinstance(e, TypeError):
                e = ValueError(str(e))
            elif not isinstance(e, (Overloaded, RequestDeadlineExceeded, RequestCancelled, ValueError)):
                log.error("sandbox failed: %s", e)  # a sandbox that failed to boot: transient, retryable
                e = Unavailable(f"sandbox could not run the code: {e}")
            label = next((name for kind, name in OUTCOMES if isinstance(e, kind)), None)
            if label:
                self.m_exec.labels(self.backend, label).inc()
            context.abort(*status_for(e, "sandbox"))
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
