"""Plumbing every alphamath service shares: config, JSON logs, Prometheus metrics, gRPC server.

Config: each flag `--some-thing` can be set by the environment as `ALPHAMATH_<SVC>_SOME_THING`
(service specific, e.g. ALPHAMATH_POLICY_PORT) or `ALPHAMATH_SOME_THING` (shared, e.g.
ALPHAMATH_MODEL_DIR); flags win over the environment, the environment over the defaults.
`--help` lists every flag with its variable and default.

Metrics (one registry per service instance, served on its own HTTP port):
  alphamath_requests_total{service,method,code}        gRPC calls by status code
  alphamath_request_latency_seconds{service,method}    gRPC call latency
  alphamath_batch_size{service}                        sequences per model batch
  alphamath_<queue>_queue_depth                        requests waiting for a batch
  alphamath_model_info{service,checkpoint,...}         checkpoint in use
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from datetime import datetime, timezone
from typing import Callable, Iterable, Mapping, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

ENV_PREFIX = "ALPHAMATH_"
GRPC_PORTS = {"policy": 50051, "value": 50052, "search": 50053, "sandbox": 50054, "trainer": 50055}
METRICS_PORTS = {"policy": 9101, "value": 9102, "search": 9103, "sandbox": 9104, "trainer": 9105}
TGI_HTTP_PORT = 8080

# ---------------------------------------------------------------- configuration

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def env_names(service: str, dest: str) -> tuple[str, str]:
    """Variables that set flag `dest` of `service`, most specific first."""
    return f"{ENV_PREFIX}{service.upper()}_{dest.upper()}", f"{ENV_PREFIX}{dest.upper()}"


def service_parser(service: str, description: str, *, grpc_port: int | None = None,
                   metrics_port: int | None = None) -> argparse.ArgumentParser:
    """A parser with the flags every service has: bind host, gRPC port, metrics port, log level."""
    p = argparse.ArgumentParser(prog=f"python -m {service}_svc", description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(_service=service)
    p.add_argument("--host", default="0.0.0.0", help="address the servers bind to")
    p.add_argument("--port", type=int, default=grpc_port if grpc_port is not None else GRPC_PORTS[service],
                   help="gRPC port (0 picks a free one)")
    p.add_argument("--metrics-port", type=int,
                   default=metrics_port if metrics_port is not None else METRICS_PORTS[service],
                   help="Prometheus metrics HTTP port (0 picks a free one, -1 disables)")
    p.add_argument("--max-workers", type=int, default=64, help="gRPC handler threads")
    p.add_argument("--log-level", default="INFO", help="DEBUG | INFO | WARNING | ERROR")
    return p


def add_model_server_flags(p: argparse.ArgumentParser, *, max_batch_size: int, unit: str,
                           model_help: str) -> None:
    """The flags the policy and value servers share: which checkpoint (and where it runs), how
    requests are batched, and the Kafka cluster whose promotions the server follows."""
    p.add_argument("--model-dir", default="", help=model_help)
    p.add_argument("--checkpoint", default="", help="checkpoint id reported in Info/metrics (default: dir name)")
    p.add_argument("--dtype", default="", help="float32 | bfloat16 (default: bf16 where the CPU is fast at it)")
    p.add_argument("--device", default="cpu", help="torch device of the local model: cpu | cuda | cuda:N")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="batching window")
    p.add_argument("--max-batch-size", type=int, default=max_batch_size, help=f"{unit} per batch")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before RESOURCE_EXHAUSTED")
    p.add_argument("--kafka-bootstrap", default="",
                   help="follow promoted checkpoints on this Kafka cluster (local backend; empty: off)")


def parse_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
                 environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Parse argv with the ALPHAMATH_* environment as defaults; bad values exit with a clear error."""
    environ = os.environ if environ is None else environ
    service = parser.get_default("_service") or parser.prog
    for action in parser._actions:
        if action.dest in ("help", "_service") or not action.option_strings:
            continue
        specific, shared = env_names(service, action.dest)
        name = specific if specific in environ else shared if shared in environ else None
        if action.help and action.help is not argparse.SUPPRESS:
            action.help = f"{action.help} [env {specific} or {shared}]"
        if name is None:
            continue
        raw = environ[name]
        try:
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                low = raw.strip().lower()
                if low not in _TRUE | _FALSE:
                    raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")
                value = low in _TRUE  # the variable gives the value of dest itself
            else:
                value = action.type(raw) if action.type else raw
            if action.choices is not None and value not in action.choices:
                raise ValueError(f"expected one of {list(action.choices)}")
        except (TypeError, ValueError) as e:
            parser.error(f"{name}={raw!r}: {e}")
        action.default = value
    return parser.parse_args(argv)


# ---------------------------------------------------------------- logging

_RECORD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, service, logger, msg, and any `extra=` fields."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _RECORD_ATTRS and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(service: str, level: str | int = "INFO", stream=None) -> None:
    """Route the root logger to stderr as JSON lines (replaces existing handlers)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)


# ---------------------------------------------------------------- metrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServiceMetrics:
    """The common metrics of one service, in a registry of its own (so tests can run many)."""

    def __init__(self, service: str, registry: CollectorRegistry | None = None):
        self.service = service
        self.registry = registry or CollectorRegistry()
        self.requests = Counter("alphamath_requests", "gRPC calls handled", ["service", "method", "code"],
                                registry=self.registry)
        self.latency = Histogram("alphamath_request_latency_seconds", "gRPC call latency",
                                 ["service", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("alphamath_batch_size", "sequences per model batch", ["service"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_latency = Histogram("alphamath_batch_latency_seconds", "model time per batch",
                                       ["service"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.model = Info("alphamath_model", "model and checkpoint in use", ["service"], registry=self.registry)
        self._queues: dict[str, Gauge] = {}
        self._server = None

    def queue_depth(self, queue: str) -> Gauge:
        """Gauge `alphamath_<queue>_queue_depth` (e.g. policy, value), created on first use."""
        if queue not in self._queues:
            self._queues[queue] = Gauge(f"alphamath_{queue}_queue_depth", f"requests waiting in the {queue} queue",
                                        registry=self.registry)
        return self._queues[queue]

    def set_model(self, **labels: str) -> None:
        self.model.labels(self.service).info({k: str(v) for k, v in labels.items()})

    def publish_model(self, loaded) -> None:
        """alphamath_model_info from what a server now serves (a ModelSlot's `on_swap`)."""
        self.set_model(model_id=loaded.model_id, checkpoint=loaded.checkpoint, backend=loaded.backend,
                       dtype=loaded.dtype)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.labels(self.service).observe(size)
        self.batch_latency.labels(self.service).observe(seconds)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the /metrics HTTP server in a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _method_name(full: str) -> str:
    return full.rsplit("/", 1)[-1]


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every call by final status code and records its latency (sync servers)."""

    def __init__(self, metrics: ServiceMetrics):
        self.m = metrics

    def _done(self, method: str, start: float, context, error: BaseException | None) -> None:
        code = context.code()  # set by context.abort / set_code
        if code is None:
            code = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
        self.m.requests.labels(self.m.service, method, code.name).inc()
        self.m.latency.labels(self.m.service, method).observe(time.perf_counter() - start)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        method = _method_name(handler_call_details.method)

        if handler.unary_unary:
            inner = handler.unary_unary

            def unary_unary(request, context):
                start, err = time.perf_counter(), None
                try:
                    return inner(request, context)
                except BaseException as e:
                    err = e
                    raise
                finally:
                    self._done(method, start, context, err)

            return handler._replace(unary_unary=unary_unary)
        if handler.unary_stream:
            inner_s = handler.unary_stream

            def unary_stream(request, context):
                start, err = time.perf_counter(), None
                try:
                    yield from inner_s(request, context)
                except BaseException as e:
                    err = e
                    raise
                finally:
                    self._done(method, start, context, err)

            return handler._replace(unary_stream=unary_stream)
        return handler


# ---------------------------------------------------------------- gRPC server

def enable_health_and_reflection(server, service_names: Iterable[str]):
    """Register grpc.health.v1 (SERVING for "" and each service) and reflection; return the health servicer."""
    names = list(service_names)
    servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return servicer


class GrpcServer:
    """A started sync gRPC server with health, reflection and metrics; `port` is the bound port."""

    def __init__(self, register: Callable[[grpc.Server], None], service_names: Sequence[str], *,
                 port: int, host: str = "0.0.0.0", metrics: ServiceMetrics | None = None,
                 max_workers: int = 64, options: Sequence[tuple] = ()):
        interceptors = [MetricsInterceptor(metrics)] if metrics is not None else []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
                                  interceptors=interceptors,
                                  options=[("grpc.max_receive_message_length", 64 << 20),
                                           ("grpc.max_send_message_length", 64 << 20), *options])
        register(self.server)
        self.service_names = list(service_names)
        self.health = enable_health_and_reflection(self.server, self.service_names)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC port {host}:{port}")
        self.server.start()
        self.set_serving(True)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            self.health.set(name, status)

    def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, then let in-flight calls finish for up to `grace` seconds."""
        self.set_serving(False)
        self.server.stop(grace).wait()

    def wait(self) -> None:
        self.server.wait_for_termination()


_FATAL: list[str] = []


def fail_process(reason: str) -> None:
    """A background part of a service (e.g. its checkpoint listener) died: shut the process down
    as on SIGTERM, but make `run_until_signal` exit with status 1 so Kubernetes restarts it."""
    logging.getLogger(__name__).critical("fatal: %s; shutting down with status 1", reason)
    _FATAL.append(reason)
    os.kill(os.getpid(), signal.SIGTERM)


def run_until_signal(stop: Callable[[], None], log: logging.Logger | None = None,
                     work: Callable[[threading.Event], None] | None = None) -> None:
    """Block until SIGINT/SIGTERM, then call `stop` once (graceful shutdown for Kubernetes).
    `work(done)`, if given, runs on the main thread meanwhile and must return once `done` is set.
    After a `fail_process` the shutdown ends in SystemExit(1)."""
    done = threading.Event()

    def handler(signum, _frame):
        (log or logging.getLogger(__name__)).info("shutting down", extra={"signal": signal.Signals(signum).name})
        done.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    try:
        if work is not None:
            work(done)
        done.wait()
    finally:
        stop()
    if _FATAL:
        raise SystemExit(1)


def serve_models(done: threading.Event, current: Callable[[], object | None],
                 ready: Callable[[], None] | None = None) -> None:
    """Run `current()`'s LocalLM.serve on this thread until `done`, moving to the next model when a
    checkpoint is swapped in; return when there is none (a remote backend). A model service calls it on
    its main thread, so every decode step and score of the process runs on one thread and one OpenMP
    pool (alphamath/lm/scheduler.py). `ready()` runs once, when the first model is served (or at once
    for a remote backend), unless the process is already failing: a service reports SERVING only then,
    since a request that came before would compute on its handler's thread and leave a pool there."""
    def announce() -> None:
        nonlocal ready
        if ready is not None and not _FATAL:
            ready()
        ready = None

    while not done.is_set():
        lm = current()
        if lm is None:
            announce()
            return

        def until(lm=lm) -> bool:
            announce()  # LocalLM.serve calls it first once it serves
            return done.is_set() or current() is not lm

        lm.serve(until)


# ---------------------------------------------------------------- CPU threads

def cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs this process's cgroup may use under its CFS quota (a Kubernetes CPU limit): cgroup v2
    `cpu.max` ("200000 100000" = 2 CPUs), else v1 `cpu/cpu.cfs_quota_us` over `cpu.cfs_period_us`.
    None when unlimited or unreadable."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def cpu_threads(env: Mapping[str, str] | None = None, root: str = "/sys/fs/cgroup") -> int:
    """Threads for torch's intra-op pool: OMP_NUM_THREADS when set; else the CPUs this process may run
    on (its affinity mask) capped by its cgroup's quota, at least 1. A Kubernetes CPU limit is a
    quota, not a CPU set, so torch would start one OpenMP thread per node CPU (64 on a 64-core node for
    a pod limited to 2), and each parallel region then waits on threads the quota has descheduled:
    beside one other busy process, a 172 KB copy took ~6 ms instead of 6 us (session 24)."""
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS", "").strip().isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"])
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cpu_quota(root)
    return max(1, min(cpus, int(quota)) if quota is not None else cpus)


def configure_threads(log: logging.Logger | None = None) -> int:
    """Size torch's intra-op pool by `cpu_threads` (model services call it before loading a model)."""
    import torch

    n = cpu_threads()
    torch.set_num_threads(n)
    (log or logging.getLogger(__name__)).info("torch threads", extra={"threads": n, "quota": cpu_quota()})
    return n


# ---------------------------------------------------------------- errors and their status codes

class InvalidArgument(ValueError):
    """A request field is out of range; servers answer INVALID_ARGUMENT with this message."""


class Unavailable(RuntimeError):
    """A dependency (e.g. the TGI server) is down, or the server is shutting down: UNAVAILABLE."""


class Overloaded(RuntimeError):
    """The request queue is full: RESOURCE_EXHAUSTED, the client should back off and retry."""


class DependencyUnavailable(RuntimeError):
    """A dependency stayed unreachable (or overloaded) for the whole retry budget."""

    def __init__(self, service: str, addr: str, waited_s: float, detail: str):
        self.service, self.addr, self.waited_s, self.detail = service, addr, waited_s, detail
        super().__init__(f"{service} service at {addr} unavailable (retried for {waited_s:.1f} s): {detail}")


class DependencyError(RuntimeError):
    """A dependency rejected a call for a reason retrying cannot fix (e.g. INVALID_ARGUMENT)."""

    def __init__(self, service: str, addr: str, code: grpc.StatusCode, detail: str):
        self.service, self.addr, self.code, self.detail = service, addr, code, detail
        super().__init__(f"{service} service at {addr} failed with {code.name}: {detail}")


class RequestCancelled(RuntimeError):
    """The request was cancelled (its client went away); stop working on it."""


class RequestDeadlineExceeded(RuntimeError):
    """The request's deadline passed while its work was under way."""


def status_for(exc: BaseException, service: str = "") -> tuple[grpc.StatusCode, str]:
    """The one map from an exception out of a request to the status code (and message) its client
    sees; every server answers through it, so a kind of failure reads the same from every service."""
    failed = f"{service} failed: " if service else ""
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry with backoff"
    if isinstance(exc, RequestDeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, f"{service or 'the request'} did not finish before the deadline: {exc}"
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline expired before the batch ran"
    if isinstance(exc, RequestCancelled):
        return grpc.StatusCode.CANCELLED, str(exc)
    if isinstance(exc, (Unavailable, DependencyUnavailable)):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, DependencyError):
        return grpc.StatusCode.INTERNAL, str(exc)
    return grpc.StatusCode.INTERNAL, f"{failed}{type(exc).__name__}: {exc}"


def abort_for(context, exc: BaseException, log: logging.Logger | None = None, service: str = ""):
    """Abort the request with `status_for(exc)`; an INTERNAL error is logged with its traceback."""
    code, msg = status_for(exc, service)
    if code == grpc.StatusCode.INTERNAL:
        (log or logging.getLogger(__name__)).error("request failed", exc_info=exc)
    context.abort(code, msg)
