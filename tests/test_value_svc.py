"""value_svc over real gRPC on loopback: batching, validation, overload, health, metrics, tiny model."""
from __future__ import annotations

import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alphamath.pb import value_pb2, value_pb2_grpc
from alphamath.service import ServiceMetrics
from alphamath.local import LocalPolicy, LocalValue
from tests.test_policy_svc import tiny_lm
from value_svc.server import LoadedValue, ValueServer


class LenValue:
    """V(state) = len(state) / 100 - 1 (clipped by the server), recording each batch."""

    def __init__(self):
        self.calls, self.gate = [], None
        self.entered = threading.Event()  # set when a batch reaches the model (tests wait on it)

    def score(self, states):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        self.calls.append(list(states))
        return [len(s) / 100 - 1 for s in states]


@pytest.fixture
def server():
    servers = []

    def start(value=None, **kw):
        kw.setdefault("window_s", 0.03)
        s = ValueServer(LoadedValue(value or LenValue(), model_id="len", checkpoint="ckpt-0"), host="127.0.0.1",
                        port=0, metrics_port=0, metrics=ServiceMetrics("value"), **kw)
        servers.append(s)
        channel = grpc.insecure_channel(f"127.0.0.1:{s.port}")
        return s, value_pb2_grpc.ValueServiceStub(channel), channel

    yield start
    for s in servers:
        s.stop(0)


def test_score_batches_concurrent_requests(server):
    value = LenValue()
    s, stub, _ = server(value)
    states = [["a" * 10, "b" * 50], ["c" * 300], ["d" * 100, "e"]]
    with ThreadPoolExecutor(3) as pool:
        resps = list(pool.map(lambda st: stub.Score(value_pb2.ScoreRequest(states=st), timeout=10), states))
    assert [list(r.values) for r in resps] == [[-0.9, -0.5], [1.0], [0.0, -0.99]]  # 300 chars clipped to 1
    assert all(r.checkpoint == "ckpt-0" for r in resps)
    assert len(value.calls) == 1 and len(value.calls[0]) == 5
    info = stub.Info(value_pb2.ValueInfoRequest(), timeout=5)
    assert (info.checkpoint, info.model_id) == ("ckpt-0", "len")


@pytest.mark.parametrize("states, message", [
    ([], "states must not be empty"),
    (["ok", ""], "states[1] is empty"),
    (["x" * 40_000], "the limit is 32000"),
    (["s"] * 300, "at most 256 states"),
])
def test_bad_requests_are_invalid_argument(server, states, message):
    s, stub, _ = server()
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(value_pb2.ScoreRequest(states=states), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()


def test_overload_health_and_metrics(server):
    value = LenValue()
    value.gate = threading.Event()
    s, stub, channel = server(value, max_queue=1, max_batch_size=1, window_s=0)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(stub.Score, value_pb2.ScoreRequest(states=["run"]), timeout=10)
        assert value.entered.wait(10)  # "run" is in the model
        queued = pool.submit(stub.Score, value_pb2.ScoreRequest(states=["wait"]), timeout=10)
        deadline = time.monotonic() + 30
        while s.servicer.batcher.depth < 1:  # "wait" is queued: the queue (1) is full
            assert time.monotonic() < deadline, "the second request never reached the queue"
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(value_pb2.ScoreRequest(states=["over"]), timeout=5)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        value.gate.set()
        assert running.result().values and queued.result().values
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="alphamath.v1.ValueService"), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    s.servicer.slot.swap(LoadedValue(LenValue(), model_id="len", checkpoint="round-2"))
    assert stub.Score(value_pb2.ScoreRequest(states=["x"]), timeout=5).checkpoint == "round-2"
    text = urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=5).read().decode()
    assert "alphamath_value_queue_depth 0.0" in text
    assert 'alphamath_requests_total{code="RESOURCE_EXHAUSTED",method="Score",service="value"} 1.0' in text
    assert 'alphamath_requests_total{code="OK",method="Score",service="value"} 3.0' in text
    assert 'checkpoint="round-2"' in text


def test_tiny_model_values_match_in_process(server, request, tmp_path_factory):
    lm = tiny_lm(request, tmp_path_factory)
    s, stub, _ = server(LocalValue(lm), window_s=0.05)
    prompt = LocalPolicy(lm).render_prompt("What is 2+3?")
    siblings = [prompt + f"Step {i}: add the numbers.</step>\n" for i in range(4)]  # share the prompt prefix
    with ThreadPoolExecutor(2) as pool:
        resps = list(pool.map(lambda st: stub.Score(value_pb2.ScoreRequest(states=st), timeout=60),
                              [siblings[:2], siblings[2:]]))
    got = [v for r in resps for v in r.values]
    assert all(-1.0 <= v <= 1.0 for v in got)
    assert got == pytest.approx(lm.score(siblings), abs=1e-5)
