"""SearchService over real gRPC on loopback: scripted policy/value services (the search server's
neighbours, served by real gRPC servers) and the real sandbox service with the gVisor executor."""
from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alphamath.convert import completions_to_pb
from alphamath.pb import policy_pb2, policy_pb2_grpc, search_pb2, search_pb2_grpc, value_pb2, value_pb2_grpc
from alphamath.service import GrpcServer
from alphamath.tree import Tree
from alphamath.remote import RetryPolicy
from search_svc.server import SearchServer, SearchServerConfig
from tests.fakes import ConstValue, ScriptedPolicy, sample

QUESTION = "What is 3 * 4 + 1?"
CODE = sample("Multiply first.\n<code>\nprint(3 * 4 + 1)\n</code>", prior=0.8)
RIGHT = sample("So the answer is \\boxed{13}.</step>", prior=0.6)
WRONG = sample("It is \\boxed{12}.</step>", prior=0.3)
AFTER_CODE = sample("The result is \\boxed{13}.</step>", prior=0.9)
SCRIPT = {(): [CODE, RIGHT, WRONG], ("Multiply first.\n",): [AFTER_CODE]}
SMALL = dict(iterations=4, n_children=3, beam_b1=2, beam_b2=2, majority_k=3, max_depth=4)


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    """Serves any Policy object; can fail its first calls, delay, or block on a gate."""

    def __init__(self, policy, delay_s: float = 0.0, fail_first: int = 0, gate: threading.Event | None = None):
        self.policy, self.delay_s, self.fail_first, self.gate = policy, delay_s, fail_first, gate
        self.calls = 0
        self.entered = threading.Event()

    def Generate(self, request, context):
        self.calls += 1
        self.entered.set()
        if self.fail_first > 0:
            self.fail_first -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        if self.gate is not None:
            self.gate.wait(30)
        time.sleep(self.delay_s)
        out = self.policy.generate(list(request.prompts), request.n, stop=list(request.stop),
                                   temperature=request.temperature, top_p=request.top_p,
                                   max_new_tokens=request.max_new_tokens, seed=request.seed)
        return policy_pb2.GenerateResponse(completions=completions_to_pb(out), checkpoint="scripted-ckpt")

    def RenderPrompt(self, request, context):
        return policy_pb2.RenderPromptResponse(prompt=self.policy.render_prompt(request.question))


class ValueServicer(value_pb2_grpc.ValueServiceServicer):
    def __init__(self, value):
        self.value = value

    def Score(self, request, context):
        return value_pb2.ScoreResponse(values=self.value.score(list(request.states)), checkpoint="scripted-ckpt")


def wait_for(cond, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Wait until cond() holds (polling a state the server exposes), or fail naming it."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


def _serve(add, servicer, name):
    return GrpcServer(lambda s: add(servicer, s), [name], port=0, host="127.0.0.1", max_workers=16)


class Stack:
    """Scripted policy + value services, the shared sandbox service, and a search server."""

    def __init__(self, sandbox_port: int, policy: PolicyServicer | None = None, publisher=None,
                 retry: RetryPolicy | None = None, **config):
        self.policy = policy or PolicyServicer(ScriptedPolicy(SCRIPT))
        self.value = ValueServicer(ConstValue(0.0, by_text={"13": 0.9, "12": -0.5}))
        self.policy_srv = _serve(policy_pb2_grpc.add_PolicyServiceServicer_to_server, self.policy,
                                 "alphamath.v1.PolicyService")
        self.value_srv = _serve(value_pb2_grpc.add_ValueServiceServicer_to_server, self.value,
                                "alphamath.v1.ValueService")
        self.search = SearchServer(policy_addr=f"127.0.0.1:{self.policy_srv.port}",
                                   value_addr=f"127.0.0.1:{self.value_srv.port}",
                                   sandbox_addr=f"127.0.0.1:{sandbox_port}", port=0, metrics_port=0,
                                   config=SearchServerConfig(**config), publisher=publisher,
                                   retry=retry or RetryPolicy(retry_budget_s=2.0))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.search.port}")
        self.stub = search_pb2_grpc.SearchServiceStub(self.channel)

    def close(self):
        self.channel.close()
        self.search.stop(0)
        self.policy_srv.stop(0)
        self.value_srv.stop(0)


@pytest.fixture(scope="module")
def sandbox_port():
    from alphamath.sandbox.executor import Executor
    from sandbox_svc.server import SandboxServer

    server = SandboxServer(Executor(backend="runsc", pool_size=2), port=0, max_concurrency=4, own_executor=True)
    yield server.port
    server.stop(0)


@pytest.fixture
def make_stack(sandbox_port):
    stacks = []

    def make(**kw):
        stacks.append(Stack(sandbox_port, **kw))
        return stacks[-1]

    yield make
    for s in stacks:
        s.close()


def request(method=search_pb2.METHOD_MCTS, question=QUESTION, include_tree=False, **params):
    return search_pb2.SolveRequest(question=question, method=method, include_tree=include_tree,
                                   parameters=search_pb2.SearchParameters(**{**SMALL, **params}))


@pytest.mark.parametrize("method", ["greedy", "sbs", "mcts", "majority"])
def test_solve_each_method_through_grpc(make_stack, method):
    stack = make_stack()
    req = request(getattr(search_pb2, f"METHOD_{method.upper()}"), include_tree=True)
    req.ground_truth, req.question_id = "13", "q-1"
    resp = stack.stub.Solve(req, timeout=60)
    assert resp.answer == "13" and resp.correct is True
    assert resp.method == method and resp.question_id == "q-1" and resp.checkpoint == "scripted-ckpt"
    assert resp.steps and resp.steps[-1].kind == "answer"
    if method == "greedy":  # the highest-prior path: a code step whose output came from the sandbox
        assert [s.kind for s in resp.steps] == ["code", "answer"]
        assert resp.steps[0].output.strip() == "13" and not resp.steps[0].code_error
    tree = Tree.from_json(resp.tree.tree_json)
    assert resp.tree.nodes == len(tree.nodes) > 1 and tree.meta["answer"] == "13"
    assert resp.sandbox_backend == tree.meta["sandbox_backend"] == "runsc"  # named, never implicit
    if method == "mcts":
        assert resp.tree.root_visits == tree.root.N > 0


def test_solve_stream_reports_progress_then_result(make_stack):
    stack = make_stack()
    events = list(stack.stub.SolveStream(request(iterations=3), timeout=60))
    progress, last = events[:-1], events[-1]
    assert last.WhichOneof("event") == "result" and last.result.answer == "13"
    assert progress and all(e.WhichOneof("event") == "progress" for e in progress)
    done = [e.progress.iterations_done for e in progress]
    assert done == sorted(done) and done[-1] <= 3 and progress[-1].progress.iterations_total == 3
    assert progress[-1].progress.nodes >= 4 and progress[-1].progress.best_answer == "13"


class RecordingPublisher:
    def __init__(self, fail_for: str | None = None):
        self.trees, self.fail_for = [], fail_for

    def publish(self, tree, checkpoint, search_config):
        if tree.question_id == self.fail_for:
            raise ConnectionError("broker down")
        self.trees.append((tree, checkpoint, search_config))


def test_generate_trees_publishes_each_tree_before_reporting_it(make_stack):
    pub = RecordingPublisher(fail_for="c")
    stack = make_stack(publisher=pub)
    qs = [search_pb2.Question(id=i, question=QUESTION, ground_truth=gt) for i, gt in (("a", "13"), ("b", "12"), ("c", "13"))]
    results = list(stack.stub.GenerateTrees(
        search_pb2.GenerateTreesRequest(questions=qs, parameters=search_pb2.SearchParameters(**SMALL),
                                        concurrency=2), timeout=120))
    by_id = {r.question_id: r for r in results}
    assert sorted(by_id) == ["a", "b", "c"]
    assert by_id["a"].published and by_id["a"].result.correct is True
    # MCTS with ground truth backs up +1 only on the path that matches it
    assert by_id["b"].published and by_id["b"].result.answer == "12" and by_id["b"].result.correct is True
    assert not by_id["c"].published and "broker down" in by_id["c"].error
    published = {t.question_id: (t, ckpt, cfg) for t, ckpt, cfg in pub.trees}
    assert sorted(published) == ["a", "b"]
    tree, ckpt, cfg = published["a"]
    assert ckpt == "scripted-ckpt" and cfg["iterations"] == SMALL["iterations"] and tree.ground_truth == "13"
    # MCTS with ground truth: terminal answers were rewarded +1 / -1
    assert {n.correct for n in tree.nodes if n.terminal_reason == "answer"} >= {True, False}


@pytest.mark.parametrize("req, message", [
    (request(question=""), "question is empty"),
    (request(question="x" * 5000), "limit is 4000"),
    (request(method=search_pb2.METHOD_UNSPECIFIED), "unknown search method"),
    (request(iterations=0), "iterations"),
    (request(c_puct=1e6), "c_puct"),
    (request(top_p=0.0), "top_p"),
])
def test_bad_input_is_invalid_argument(make_stack, req, message):
    stack = make_stack()
    with pytest.raises(grpc.RpcError) as e:
        stack.stub.Solve(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()
    assert stack.policy.calls == 0
    with pytest.raises(grpc.RpcError) as e:
        list(stack.stub.GenerateTrees(search_pb2.GenerateTreesRequest(
            questions=[search_pb2.Question(id="x", question=QUESTION)]), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ground_truth" in e.value.details()


def _with(req, **fields):
    for k, v in fields.items():
        setattr(req, k, v)
    return req


@pytest.mark.parametrize("req, message", [
    (_with(request(), question_id="x" * 201), "question_id has 201 characters; the limit is 200"),
    (_with(request(), question_id="a\nb"), "question_id contains the control character"),
    (_with(request(), ground_truth="1\x003"), "ground_truth contains the control character"),
    (_with(request(), ground_truth="9" * 1001), "ground_truth has 1001 characters; the limit is 1000"),
    (request(question="What is 3 * 4?\x00"), "question contains the control character"),
])
def test_ids_and_texts_beyond_what_the_store_accepts_are_invalid_argument(make_stack, req, message):
    """Solve and SolveStream refuse, naming the field, what the trainer's store would refuse."""
    stack = make_stack()
    for call in (stack.stub.Solve, lambda r, timeout: list(stack.stub.SolveStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as e:
            call(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()
    assert stack.policy.calls == 0


@pytest.mark.parametrize("questions, message", [
    ([dict(id="x" * 201)], "questions[0].id has 201 characters; the limit is 200"),
    ([dict(id="a"), dict(id="b\x00")], "questions[1].id contains the control character"),
    ([dict(id="a"), dict(id="a")], "questions[1].id 'a' repeats questions[0].id"),
    ([dict(id="a", ground_truth="1\x00")], "questions[0].ground_truth contains the control character"),
    ([dict(id="a", question="Why?\x00")], "questions[0].question contains the control character"),
    ([dict(id="a", question="")], "questions[0].question is empty"),
])
def test_generate_trees_names_the_bad_question_field(make_stack, questions, message):
    stack = make_stack(publisher=RecordingPublisher())
    qs = [search_pb2.Question(**{"question": QUESTION, "ground_truth": "13", **q}) for q in questions]
    with pytest.raises(grpc.RpcError) as e:
        list(stack.stub.GenerateTrees(search_pb2.GenerateTreesRequest(questions=qs), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()
    assert stack.policy.calls == 0


def test_overload_is_resource_exhausted(make_stack):
    gate = threading.Event()
    stack = make_stack(policy=PolicyServicer(ScriptedPolicy(SCRIPT), gate=gate), max_active=1, max_queued=1)
    running = stack.stub.Solve.future(request(), timeout=30)
    assert stack.policy.entered.wait(10)
    queued = stack.stub.Solve.future(request(), timeout=30)
    wait_for(lambda: stack.search.servicer.admission.waiting == 1, what="the second search to queue")
    with pytest.raises(grpc.RpcError) as e:
        stack.stub.Solve(request(), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "overloaded" in e.value.details()
    gate.set()
    assert running.result().answer == "13" and queued.result().answer == "13"


def test_expired_deadline_is_deadline_exceeded_and_search_stops(make_stack):
    """The policy holds every call until the client's deadline has passed, so the deadline comes
    first however loaded the machine is (the script tree alone is exhausted in a few calls)."""
    gate = threading.Event()
    stack = make_stack(policy=PolicyServicer(ScriptedPolicy(SCRIPT), gate=gate))
    with pytest.raises(grpc.RpcError) as e:
        stack.stub.Solve(request(iterations=50), timeout=1.0)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    gate.set()  # the call in flight may now return: the search must not make another
    admission = stack.search.servicer.admission
    wait_for(lambda: admission.running == 0 and admission.waiting == 0, what="the search to end")
    assert stack.policy.calls <= 1  # the server stopped working on the abandoned search


def test_client_cancellation_stops_the_search(make_stack):
    stack = make_stack(policy=PolicyServicer(ScriptedPolicy(SCRIPT), delay_s=0.3))
    stream = stack.stub.SolveStream(request(iterations=200, n_children=1), timeout=60)
    first = next(stream)
    assert first.WhichOneof("event") == "progress"
    stream.cancel()
    admission = stack.search.servicer.admission
    wait_for(lambda: admission.running == 0 and admission.waiting == 0, what="the search to end")
    calls = stack.policy.calls  # the search thread is gone: no call can follow
    assert calls < 10


def test_briefly_unavailable_dependency_is_retried(make_stack):
    stack = make_stack(policy=PolicyServicer(ScriptedPolicy(SCRIPT), fail_first=2))
    assert stack.stub.Solve(request(method=search_pb2.METHOD_GREEDY), timeout=30).answer == "13"
    assert stack.policy.calls >= 3
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{stack.search.metrics_port}/metrics").read().decode()
    assert 'alphamath_search_dependency_calls_total{code="UNAVAILABLE",service="policy"} 2.0' in metrics


def test_dependency_down_is_unavailable_not_a_hang(sandbox_port):
    search = SearchServer(policy_addr="127.0.0.1:1", value_addr="127.0.0.1:1", sandbox_addr=f"127.0.0.1:{sandbox_port}",
                          retry=RetryPolicy(retry_budget_s=1.0))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{search.port}") as ch:
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                search_pb2_grpc.SearchServiceStub(ch).Solve(request(), timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "policy service at 127.0.0.1:1 unavailable" in e.value.details()
            assert time.monotonic() - start < 5
    finally:
        search.stop(0)


def test_health_and_metrics(make_stack):
    stack = make_stack()
    health = health_pb2_grpc.HealthStub(stack.channel)
    for name in ("", "alphamath.v1.SearchService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    stack.stub.Solve(request(method=search_pb2.METHOD_GREEDY), timeout=30)
    with pytest.raises(grpc.RpcError):
        stack.stub.Solve(request(question=""), timeout=5)
    text = urllib.request.urlopen(f"http://127.0.0.1:{stack.search.metrics_port}/metrics").read().decode()
    assert 'alphamath_requests_total{code="OK",method="Solve",service="search"} 1.0' in text
    assert 'alphamath_requests_total{code="INVALID_ARGUMENT",method="Solve",service="search"} 1.0' in text
    assert 'alphamath_search_seconds_count{method="greedy"} 1.0' in text
    assert "alphamath_search_queue_depth 0.0" in text
    assert 'alphamath_search_dependency_calls_total{code="OK",service="sandbox"}' in text
