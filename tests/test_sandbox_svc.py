"""SandboxService over real gRPC on loopback with the real gVisor executor (a gated fake executor
only where the test is about the server's admission control)."""
from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alphamath.interfaces import ExecResult
from alphamath.pb import sandbox_pb2, sandbox_pb2_grpc
from alphamath.sandbox.executor import Limits
from sandbox_svc.server import SandboxServer


@pytest.fixture(scope="module")
def server():
    from alphamath.sandbox.executor import Executor

    srv = SandboxServer(Executor(backend="runsc", pool_size=2, timeout_s=3.0, max_output_bytes=200, max_code_bytes=2000),
                        port=0, metrics_port=0, max_concurrency=2, own_executor=True)
    yield srv
    srv.stop(0)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield sandbox_pb2_grpc.SandboxServiceStub(ch)


def execute(stub, cells, timeout=30, **limits):
    return stub.Execute(sandbox_pb2.ExecuteRequest(cells=cells, limits=sandbox_pb2.ExecLimits(**limits)),
                        timeout=timeout)


def test_cells_run_in_order_and_last_output_is_returned(stub):
    r = execute(stub, ["x = 6", "print('ignored')", "print(x * 7)"])
    assert r.stdout.strip() == "42" and not r.HasField("error") and not r.timed_out and r.duration_s > 0


def test_model_errors_come_back_as_error_not_status(stub):
    r = execute(stub, ["print(1 / 0)"])
    assert "ZeroDivisionError" in r.error and not r.timed_out


def test_limits_are_clamped_to_the_server_maxima(stub):
    start = time.monotonic()
    r = execute(stub, ["while True: pass"], timeout_s=1000.0)  # asks for more than the server's 3 s
    # the server's 3 s limit applied, not the 1000 s asked for (wall time includes sandbox start/kill)
    assert r.timed_out and "exceeded 3 s" in r.error and time.monotonic() - start < 60
    r = execute(stub, ["print('y' * 100)"], max_output_chars=10)
    assert r.stdout.startswith("y" * 10) and "truncated" in r.stdout and "y" * 11 not in r.stdout
    r = execute(stub, ["print('z' * 1000)"], max_output_chars=10_000)  # capped at the server's 200
    assert r.stdout.count("z") == 200


@pytest.mark.parametrize("cells, limits, message", [
    (["x = 1\n" * 400], {}, "the limit is 2000 bytes"),
    (["print(1)"], {"timeout_s": -1.0}, "timeout_s must be > 0"),
])
def test_bad_requests_are_invalid_argument(stub, cells, limits, message):
    with pytest.raises(grpc.RpcError) as e:
        execute(stub, cells, **limits)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()


def test_health_and_metrics(server, stub):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="alphamath.v1.SandboxService"), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    execute(stub, ["print(1)"])
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    assert 'alphamath_requests_total{code="OK",method="Execute",service="sandbox"}' in text
    assert 'alphamath_sandbox_executions_total{backend="runsc",outcome="ok"}' in text
    assert 'alphamath_sandbox_backend_info{backend="runsc",production="true",strength="gvisor"} 1.0' in text
    assert server.executor.drain(30)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    assert 'alphamath_sandbox_teardowns_total{backend="runsc",outcome="ok"}' in text
    assert "alphamath_sandbox_queue_depth 0.0" in text


def test_backend_is_in_every_response_and_in_info(stub):
    assert execute(stub, ["print(2)"]).backend == "runsc"
    info = stub.Info(sandbox_pb2.SandboxInfoRequest(), timeout=10)
    assert (info.backend, info.strength, info.production, info.pool_size) == ("runsc", "gvisor", True, 2)
    assert (info.timeout_s, info.max_output_chars, info.max_code_bytes, info.max_concurrency) == (3.0, 200, 2000, 2)


class GatedExecutor:
    """Blocks every execution until released: makes the server's queue observable."""

    limits = Limits(timeout_s=5.0)

    def __init__(self):
        self.gate, self.running = threading.Event(), 0

    def execute(self, cells):
        self.running += 1
        self.gate.wait(30)
        return ExecResult(stdout="done\n", duration_s=0.01)


def test_full_queue_is_resource_exhausted_and_expired_wait_is_deadline_exceeded():
    ex = GatedExecutor()
    srv = SandboxServer(ex, port=0, max_concurrency=1, max_queue=1)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = sandbox_pb2_grpc.SandboxServiceStub(ch)
            req = sandbox_pb2.ExecuteRequest(cells=["print(1)"])
            running = stub.Execute.future(req, timeout=30)
            while ex.running == 0:
                time.sleep(0.01)
            # waiting for the one slot: its deadline passes in the queue
            with pytest.raises(grpc.RpcError) as e:
                stub.Execute(req, timeout=0.3)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            deadline = time.monotonic() + 10  # the server drops the expired waiter on its own clock
            while srv.servicer.gate.waiting and time.monotonic() < deadline:
                time.sleep(0.01)
            assert srv.servicer.gate.waiting == 0
            queued = stub.Execute.future(req, timeout=30)
            while srv.servicer.gate.waiting == 0:
                time.sleep(0.01)
            with pytest.raises(grpc.RpcError) as e:
                stub.Execute(req, timeout=5)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "overloaded" in e.value.details()
            ex.gate.set()
            assert running.result().stdout == "done\n" and queued.result().stdout == "done\n"
            assert ex.running == 2  # the refused and the expired requests never ran
    finally:
        ex.gate.set()
        srv.stop(0)


def test_the_service_imports_no_torch_and_the_slim_image_pins_match():
    """The Dockerfile's optional `sandbox` target installs the service without torch: that holds
    only while the service imports none, and while its pins are pyproject's."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, sandbox_svc.server, alphamath.sandbox.executor; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"
    root = Path(__file__).resolve().parents[1]
    pins = dict(re.findall(r'"([a-z0-9-]+)==([^"]+)"', (root / "pyproject.toml").read_text()))
    stage = (root / "Dockerfile").read_text().split("AS build-sandbox")[1].split("\nFROM ")[0]
    slim = dict(re.findall(r"([a-z0-9-]+)==(\S+)", stage))
    assert slim and all(pins[name] == version for name, version in slim.items()), (slim, pins)
