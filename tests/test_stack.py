"""The local stack as real processes on free loopback ports (tiny random model for policy/value,
the real gVisor sandbox): health, metrics, every search method through gRPC, the client CLI,
a dependency killed mid-request, and `stop` ending exactly the processes it started."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request

import grpc
import pytest

from app import client
from app.stack import SERVICES, LocalStack, Ports, _pid_alive_as, free_ports

# The tiny random model writes no well-formed steps, so keep paths short and searches small.
PARAMS = {"greedy": dict(max_new_tokens=24, max_depth=3),
          "sbs": dict(beam_b1=2, beam_b2=2, max_new_tokens=24, max_depth=3),
          "mcts": dict(iterations=3, n_children=2, max_new_tokens=24, max_depth=3),
          "majority": dict(majority_k=2, max_new_tokens=24, max_depth=3)}


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    p = free_ports(2 * len(SERVICES) + 1)
    ports = Ports(dict(zip(SERVICES, p[:4])), dict(zip(SERVICES, p[4:8])), http=p[8])
    st = LocalStack(tmp_path_factory.mktemp("var"), ports=ports, model_dir=tiny_model_dir,
                    env={"ALPHAMATH_SEARCH_RETRY_BUDGET_S": "2", "ALPHAMATH_SANDBOX_POOL_SIZE": "1",
                         "ALPHAMATH_DTYPE": "float32", "ALPHAMATH_LOG_LEVEL": "WARNING"})
    try:
        st.start(timeout_s=180)
        yield st
    finally:
        st.stop(timeout_s=10)


def search_addr(stack) -> str:
    return stack.ports.addr("search")


def test_every_service_is_healthy_has_a_pid_file_and_serves_metrics(stack):
    status = client.health({s: stack.ports.addr(s) for s in SERVICES})
    assert status == {s: "SERVING" for s in SERVICES}
    running = stack.running()
    assert sorted(running) == sorted(SERVICES)
    for s in SERVICES:
        assert stack.pidfile(s).is_file() and stack.logfile(s).is_file()
        text = urllib.request.urlopen(f"http://127.0.0.1:{stack.ports.metrics[s]}/metrics", timeout=5).read()
        assert b"alphamath_request" in text


@pytest.mark.parametrize("method", ["greedy", "sbs", "mcts", "majority"])
def test_solve_each_method_through_the_stack(stack, method):
    resp = client.solve(search_addr(stack), "What is 2 + 3?", method, PARAMS[method], timeout_s=120,
                        ground_truth="5", question_id=f"q-{method}")
    assert resp.method == method and resp.question_id == f"q-{method}"
    assert resp.tree.nodes > 1 and resp.checkpoint  # the policy's checkpoint id came back
    assert resp.HasField("correct")  # ground truth given: correctness is always reported
    if method == "mcts":
        assert resp.tree.root_visits >= 1


def test_solve_stream_through_the_stack(stack):
    events = list(client.solve_stream(search_addr(stack), "What is 2 + 3?", "mcts", PARAMS["mcts"], timeout_s=120))
    assert events[-1].WhichOneof("event") == "result"
    assert all(e.WhichOneof("event") == "progress" for e in events[:-1]) and len(events) >= 2


def test_client_cli(stack, capsys):
    args = ["--addr", search_addr(stack), "--max-new-tokens", "24", "--max-depth", "3"]
    assert client.main(["solve", "What is 2 + 3?", "--method", "greedy", *args]) == 0
    out = capsys.readouterr().out
    assert "Answer:" in out and "sandbox runsc" in out
    assert client.main(["solve", "   ", "--method", "greedy", *args]) == 1
    assert "INVALID_ARGUMENT: question is empty" in capsys.readouterr().err


def test_killing_a_dependency_mid_request_is_unavailable_and_others_stay_healthy(stack):
    """The policy process is SIGKILLed while it is generating for a search: the client gets a
    clear UNAVAILABLE within the retry budget, and value/sandbox/search stay SERVING."""
    channel, stub = client.search_stub(search_addr(stack))
    with channel:
        # long steps keep the policy busy for a while
        fut = stub.Solve.future(client.solve_request("What is 2 + 3?", "mcts",
                                                     dict(iterations=50, n_children=8, max_new_tokens=2048)),
                                timeout=60)
        time.sleep(1.0)
        assert not fut.done(), "the request finished before the kill; make it longer"
        os.kill(stack.running()["policy"], signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as e:
            fut.result()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"policy service at {stack.ports.addr('policy')} unavailable" in e.value.details()
        retried = float(re.search(r"retried for ([0-9.]+) s", e.value.details()).group(1))
        assert retried >= 1.0  # retried with backoff for the 2 s budget (the client's own record), then gave up
    status = client.health({s: stack.ports.addr(s) for s in SERVICES})
    assert status["policy"].startswith("UNREACHABLE")
    assert {s: status[s] for s in ("value", "sandbox", "search")} == dict.fromkeys(("value", "sandbox", "search"),
                                                                                 "SERVING")


def test_stop_ends_exactly_the_processes_it_started(stack):
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        pids = stack.running()
        # a pid file whose pid now belongs to someone else must not be signalled
        stack.pidfile("policy").write_text(f'{{"pid": {bystander.pid}, "module": "policy_svc"}}')
        stopped = stack.stop(timeout_s=10)
        assert sorted(stopped) == sorted(s for s in pids if s != "policy")
        assert bystander.poll() is None
        for s, pid in pids.items():
            assert not _pid_alive_as(pid, f"{s}_svc")
        assert not any(stack.pidfile(s).exists() for s in SERVICES)
    finally:
        bystander.kill()
        bystander.wait()


def test_the_stacks_model_services_compute_in_turns_through_one_lock_file(tmp_path, monkeypatch):
    """The policy and value services share the machine's cores, so the stack gives both the same
    ALPHAMATH_COMPUTE_LOCK (lm/lock.py); services without a model get none, and a value set by the caller wins."""
    monkeypatch.delenv("ALPHAMATH_COMPUTE_LOCK", raising=False)
    stack = LocalStack(tmp_path, ports=Ports.standard())
    assert stack._env("policy")["ALPHAMATH_COMPUTE_LOCK"] == stack._env("value")["ALPHAMATH_COMPUTE_LOCK"] \
        == str(tmp_path / "compute.lock")
    assert "ALPHAMATH_COMPUTE_LOCK" not in stack._env("search") and "ALPHAMATH_COMPUTE_LOCK" not in stack._env("sandbox")
    mine = LocalStack(tmp_path, ports=Ports.standard(), env={"ALPHAMATH_COMPUTE_LOCK": "/tmp/elsewhere.lock"})
    assert mine._env("value")["ALPHAMATH_COMPUTE_LOCK"] == "/tmp/elsewhere.lock"
