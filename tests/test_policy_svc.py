"""policy_svc over real gRPC on loopback: batching, validation, overload, deadlines, health, metrics."""
from __future__ import annotations

import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from alphamath import convert
from alphamath.batcher import Batcher
from alphamath.interfaces import Sample
from alphamath.local import LocalPolicy
from alphamath.pb import policy_pb2, policy_pb2_grpc
from alphamath.service import Overloaded, ServiceMetrics, parse_config, service_parser
from policy_svc.server import LoadedPolicy, PolicyLimits, PolicyServer


def wait_for(cond, what: str, timeout_s: float = 30.0) -> None:
    """Wait until cond() holds (a state the server exposes), or fail naming it."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for: {what}")
        time.sleep(0.01)


# ---------------------------------------------------------------- neighbours

class EchoPolicy:
    """Sample k of prompt p is f"{p}#{k}"; records every batch it was called with."""

    def __init__(self, delay_s: float = 0.0):
        self.calls, self.delay_s, self.gate = [], delay_s, None
        self.entered = threading.Event()  # set when a batch reaches the model (tests wait on it)

    def render_prompt(self, question):
        return f"Q: {question}\n<step>"

    def generate(self, prompts, n, *, stop, temperature, top_p=1.0, max_new_tokens=256, seed=None):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay_s)
        self.calls.append((list(prompts), n, tuple(stop), temperature, seed))
        return [[Sample(f"{p}#{k}</step>", 3, -0.5 * (k + 1), "stop") for k in range(n)] for p in prompts]


def tiny_lm(request, tmp_path_factory):
    """LocalLM over the shared tiny random model (conftest) or, until it exists, one built here."""
    from alphamath.lm import LocalLM

    try:
        model_dir = request.getfixturevalue("tiny_model_dir")
    except pytest.FixtureLookupError:
        model_dir = _build_tiny_model(tmp_path_factory.mktemp("tiny"))
    return LocalLM(model_dir, dtype="float32")


def _build_tiny_model(path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from alphamath.model import ValueHeadModel, embedded_checkpoint

    tok = AutoTokenizer.from_pretrained(embedded_checkpoint())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    ValueHeadModel(LlamaForCausalLM(cfg), tok).save_pretrained(path)
    return path


@pytest.fixture
def server():
    servers = []

    def start(policy=None, **kw):
        kw.setdefault("window_s", 0.02)
        s = PolicyServer(LoadedPolicy(policy or EchoPolicy(), model_id="echo", checkpoint="ckpt-0", backend="local"),
                         host="127.0.0.1", port=0, metrics_port=0, metrics=ServiceMetrics("policy"), **kw)
        servers.append(s)
        channel = grpc.insecure_channel(f"127.0.0.1:{s.port}")
        return s, policy_pb2_grpc.PolicyServiceStub(channel), channel

    yield start
    for s in servers:
        s.stop(0)


def req(prompts=("p",), n=2, **kw):
    kw.setdefault("temperature", 0.7)
    kw.setdefault("stop", ["</step>"])
    return policy_pb2.GenerateRequest(prompts=list(prompts), n=n, **kw)


# ---------------------------------------------------------------- batcher

def test_batcher_gathers_concurrent_requests_by_key():
    seen = []

    def fn(key, payloads):
        seen.append((key, list(payloads)))
        return [p * 10 for p in payloads]

    b = Batcher(fn, max_batch_size=4, window_s=0.05, max_queue=16)
    futs = [b.submit("a", i) for i in range(6)] + [b.submit("b", 100)]
    assert [f.result(5) for f in futs] == [0, 10, 20, 30, 40, 50, 1000]
    b.close()
    assert [(k, p) for k, p in seen] == [("a", [0, 1, 2, 3]), ("a", [4, 5]), ("b", [100])]


def test_batcher_bounded_queue_cancellation_and_errors():
    gate = threading.Event()
    ran = []

    entered = threading.Event()

    def fn(key, payloads):
        entered.set()
        gate.wait(5)
        ran.extend(payloads)
        if "boom" in payloads:
            raise RuntimeError("model failed")
        return payloads

    b = Batcher(fn, max_batch_size=1, window_s=0, max_queue=2)
    first = b.submit(None, "running")
    assert entered.wait(10)  # the worker holds "running"; the queue is empty again
    queued = [b.submit(None, "cancelled"), b.submit(None, "boom")]
    with pytest.raises(Overloaded, match="queue is full"):
        b.submit(None, "rejected")
    assert queued[0].cancel()
    gate.set()
    assert first.result(5) == "running"
    with pytest.raises(RuntimeError, match="model failed"):
        queued[1].result(5)
    assert ran == ["running", "boom"]  # the cancelled request never reached the model
    b.close()


# ---------------------------------------------------------------- gRPC

def test_generate_round_trip_and_info(server):
    s, stub, _ = server()
    resp = stub.Generate(req(["a", "b"], n=3, top_p=0.9, max_new_tokens=32, seed=7), timeout=10)
    out = convert.completions_from_pb(resp)
    assert [[x.text for x in c] for c in out] == [[f"a#{k}</step>" for k in range(3)], [f"b#{k}</step>" for k in range(3)]]
    assert out[0][1] == Sample("a#1</step>", 3, -1.0, "stop")
    assert resp.checkpoint == "ckpt-0" and resp.usage.decode_tokens == 18
    info = stub.Info(policy_pb2.InfoRequest(), timeout=5)
    assert (info.checkpoint, info.backend, info.max_n) == ("ckpt-0", "local", PolicyLimits().max_n)
    assert stub.RenderPrompt(policy_pb2.RenderPromptRequest(question="1+1?"), timeout=5).prompt == "Q: 1+1?\n<step>"


def test_concurrent_searches_share_batches(server):
    policy = EchoPolicy(delay_s=0.05)
    s, stub, _ = server(policy, window_s=0.05)
    with ThreadPoolExecutor(8) as pool:
        resps = list(pool.map(lambda i: stub.Generate(req([f"q{i}"], n=2, seed=1), timeout=10), range(8)))
    for i, r in enumerate(resps):  # every caller gets its own prompt's samples back
        assert r.completions[0].samples[0].text == f"q{i}#0</step>"
    assert len(policy.calls) < 8, policy.calls
    assert max(len(c[0]) for c in policy.calls) > 1
    # different sampling parameters are never mixed in one batch
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda t: stub.Generate(req(["x"], n=1, temperature=t), timeout=10), [0.5, 0.9]))
    assert {c[3] for c in policy.calls[-2:]} == {0.5, 0.9}


@pytest.mark.parametrize("bad, message", [
    (dict(prompts=[]), "prompts must not be empty"),
    (dict(prompts=["ok", ""]), "prompts[1] is empty"),
    (dict(prompts=["x" * 40_000]), "the limit is 32000"),
    (dict(n=0), "n must be in"),
    (dict(n=65), "n must be in"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=100_000), "max_new_tokens"),
    (dict(stop=[""]), "stop[0]"),
    (dict(stop=["s"] * 9), "stop strings"),
])
def test_bad_generate_requests_are_invalid_argument(server, bad, message):
    s, stub, _ = server()
    args = dict(prompts=["p"], n=2, temperature=0.7, stop=["</step>"])
    args.update(bad)
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(policy_pb2.GenerateRequest(**args), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details()


def test_bad_render_prompt(server):
    s, stub, _ = server()
    for q in ("", "   ", "x" * 9000):
        with pytest.raises(grpc.RpcError) as e:
            stub.RenderPrompt(policy_pb2.RenderPromptRequest(question=q), timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_overload_is_resource_exhausted_and_deadline_is_exceeded(server):
    policy = EchoPolicy()
    policy.gate = threading.Event()
    s, stub, _ = server(policy, max_queue=2, max_batch_size=1, window_s=0)
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(stub.Generate, req(["first"], n=1), timeout=10)
        assert policy.entered.wait(10)  # "first" is in the model; fill the queue
        queued = [pool.submit(stub.Generate, req([f"q{i}"], n=1), timeout=10) for i in range(2)]
        wait_for(lambda: s.servicer.batcher.depth == 2, "two requests queued")
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(req(["over"], n=1), timeout=5)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in e.value.details()
        policy.gate.set()
        assert running.result().completions[0].samples[0].text == "first#0</step>"
        assert all(f.result().completions for f in queued)
    policy.gate, policy.entered = threading.Event(), threading.Event()  # block again: a deadline expires queued
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(stub.Generate, req(["blocker"], n=1), timeout=10)
        assert policy.entered.wait(10)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(req(["late"], n=1), timeout=0.3)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        queue = s.servicer.batcher._pending  # the server cancels "late" when its deadline passes
        wait_for(lambda: len(queue) == 1 and queue[0].future.cancelled(), "the expired request to be cancelled")
        policy.gate.set()
        blocker.result()
    assert stub.Generate(req(["probe"], n=1), timeout=10).completions  # one batch at a time, in order:
    assert not any("late" in c[0] for c in policy.calls)  # ... "late" was dropped, never run


def test_backend_failure_is_internal_and_server_stays_healthy(server):
    class Broken(EchoPolicy):
        def generate(self, prompts, n, **kw):
            if prompts[0] == "crash":
                raise RuntimeError("CUDA says no")
            return super().generate(prompts, n, **kw)

    s, stub, _ = server(Broken(), window_s=0)
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(req(["crash"]), timeout=5)
    assert e.value.code() == grpc.StatusCode.INTERNAL and "CUDA says no" in e.value.details()
    assert stub.Generate(req(["fine"]), timeout=5).completions


def test_health_reflection_metrics_and_checkpoint_swap(server):
    s, stub, channel = server()
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "alphamath.v1.PolicyService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "alphamath.v1.PolicyService" in {x.name for x in answer.list_services_response.service}

    stub.Generate(req(), timeout=5)
    with pytest.raises(grpc.RpcError):
        stub.Generate(req(n=0), timeout=5)
    s.servicer.slot.swap(LoadedPolicy(EchoPolicy(), model_id="echo", checkpoint="round-1", backend="local"))
    assert stub.Generate(req(), timeout=5).checkpoint == "round-1"
    text = urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=5).read().decode()
    assert 'alphamath_requests_total{code="OK",method="Generate",service="policy"} 2.0' in text
    assert 'alphamath_requests_total{code="INVALID_ARGUMENT",method="Generate",service="policy"} 1.0' in text
    assert "alphamath_policy_queue_depth 0.0" in text
    assert 'alphamath_batch_size_count{service="policy"} 2.0' in text
    assert 'alphamath_request_latency_seconds_count{method="Generate",service="policy"} 3.0' in text
    assert 'checkpoint="round-1"' in text
    s.grpc.set_serving(False)
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
        health_pb2.HealthCheckResponse.NOT_SERVING


def test_local_model_over_grpc_matches_in_process(server, request, tmp_path_factory):
    lm = tiny_lm(request, tmp_path_factory)
    s, stub, _ = server(LocalPolicy(lm), window_s=0.05)
    prompts = [LocalPolicy(lm).render_prompt(q) for q in ("What is 2+3?", "What is 7*6?")]
    direct = lm.generate(prompts, 3, stop=["</step>", "</code>"], temperature=0.8, max_new_tokens=12, seed=11)
    with ThreadPoolExecutor(2) as pool:  # served in one batch, each with its own seed-derived samples
        resps = list(pool.map(lambda p: stub.Generate(
            req([p], n=3, stop=["</step>", "</code>"], temperature=0.8, max_new_tokens=12, seed=11), timeout=60),
            prompts))
    got = [convert.completions_from_pb(r)[0] for r in resps]
    key = lambda s: (s.text, s.token_count, s.finish_reason)  # noqa: E731
    assert [[key(x) for x in g] for g in got] == [[key(x) for x in d] for d in direct]
    # logprobs agree up to float noise (the second run reuses KV from the prefix cache)
    assert [x.cumulative_logprob for g in got for x in g] == \
        pytest.approx([x.cumulative_logprob for d in direct for x in d], abs=1e-4)
    greedy = stub.Generate(req(prompts[:1], n=2, temperature=0.0, max_new_tokens=8), timeout=60)
    a, b = greedy.completions[0].samples
    assert a == b and 1 <= a.token_count <= 8 and a.cumulative_logprob < 0


def test_config_from_flags_and_environment():
    from policy_svc.__main__ import build_parser

    env = {"ALPHAMATH_POLICY_PORT": "6001", "ALPHAMATH_PORT": "7001", "ALPHAMATH_DTYPE": "bfloat16",
           "ALPHAMATH_BATCH_WINDOW_MS": "2.5"}
    args = parse_config(build_parser(), [], env)
    assert (args.port, args.dtype, args.batch_window_ms, args.metrics_port, args.http_port) == \
        (6001, "bfloat16", 2.5, 9101, 8080)
    assert parse_config(build_parser(), ["--port", "1"], env).port == 1  # flags win
    with pytest.raises(SystemExit):
        parse_config(build_parser(), [], {"ALPHAMATH_BACKEND": "vllm"})
    p = service_parser("value", "x")
    p.add_argument("--verbose", action="store_true")
    assert parse_config(p, [], {"ALPHAMATH_VERBOSE": "yes"}).verbose is True
