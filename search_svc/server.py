"""SearchService: the search engine behind gRPC, many problems at once.

Concurrency model: a synchronous gRPC server whose handler threads run the synchronous engine
(`search_svc.engine.solve`) directly. The engine spends nearly all of its time blocked on the
policy / value / sandbox RPCs (which release the GIL), so threads give the same overlap as
asyncio without rewriting the engine as coroutines or hopping every dependency call between an
event loop and worker threads; the cross-request batching that makes concurrency pay happens in
policy_svc / value_svc. Admission control bounds what runs: at most `max_active` searches, at
most `max_queued` waiting for a slot, anything beyond is RESOURCE_EXHAUSTED at once.

Every request gets a `CallScope` (its deadline and a cancellation flag). The scope is cancelled
by gRPC's termination callback when the client goes away or the deadline passes; the engine's
progress callback checks it between simulations, and the dependency clients check it before
(and cancel on it during) every call, so an abandoned search stops within one dependency call.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace

import grpc
from prometheus_client import Counter, Gauge, Histogram

from alphamath.admission import Admission
from alphamath.convert import method_from_pb, parameters_to_overrides
from alphamath.limits import GROUND_TRUTH_CHARS, check_id, check_text
from alphamath.pb import search_pb2, search_pb2_grpc
from alphamath.remote import CallScope, Dependencies, RetryPolicy
from alphamath.search_config import SearchConfig
from alphamath.service import (LATENCY_BUCKETS, GrpcServer, RequestCancelled, RequestDeadlineExceeded, ServiceMetrics,
                               status_for)
from alphamath.tree import Tree
from search_svc.engine import check_question, solve
from search_svc.mcts import best_answer_node

log = logging.getLogger("search_svc")

MAX_BATCH_QUESTIONS = 1024



class SearchMetrics:
    """Search-specific metrics, in the registry of the service's common ServiceMetrics (which
    already counts RPCs by status code and records their latency)."""

    def __init__(self, base: ServiceMetrics):
        r = base.registry
        self.base = base
        self.latency = Histogram("alphamath_search_seconds", "wall time of one search", ["method"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.nodes = Histogram("alphamath_search_tree_nodes", "nodes per finished search tree", ["method"],
                               buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000), registry=r)
        self.outcomes = Counter("alphamath_search_outcomes", "searches by method and status code",
                                ["method", "code"], registry=r)
        self.active = Gauge("alphamath_search_active", "searches running now", registry=r)
        self.queued = base.queue_depth("search")
        self.dep_calls = Counter("alphamath_search_dependency_calls",
                                 "attempted calls from search to its dependencies, by status code",
                                 ["service", "code"], registry=r)
        self.dep_latency = Histogram("alphamath_search_dependency_seconds",
                                     "latency of successful dependency calls (retries included)",
                                     ["service"], buckets=LATENCY_BUCKETS, registry=r)
        self.published = Counter("alphamath_search_trees_published", "GenerateTrees trees by publish outcome",
                                 ["outcome"], registry=r)

    def dependency_call(self, service: str, code: str, seconds: float | None) -> None:
        self.dep_calls.labels(service, code).inc()
        if seconds is not None:
            self.dep_latency.labels(service).observe(seconds)


@dataclass
class SearchServerConfig:
    """Limits of one search server (flags / ALPHAMATH_SEARCH_* in search_svc.__main__)."""

    max_active: int = 32             # searches running at once
    max_queued: int = 64             # searches waiting for a slot before RESOURCE_EXHAUSTED
    batch_concurrency: int = 4       # GenerateTrees default questions at once
    max_request_s: float = 1800.0    # deadline applied when the client sets none
    defaults: SearchConfig = field(default_factory=SearchConfig)


@dataclass
class Parsed:
    question: str
    method: str
    cfg: SearchConfig
    ground_truth: str | None
    question_id: str | None
    include_tree: bool
    rewards: bool = False  # the search backs up ground-truth rewards (GenerateTrees), not just grades


def config_from_parameters(p: search_pb2.SearchParameters, defaults: SearchConfig) -> SearchConfig:
    """Unset fields take the server's defaults; ValueError names the out-of-range field."""
    return replace(defaults, **parameters_to_overrides(p)).validate()


def _answer_so_far(tree: Tree, method: str, cfg: SearchConfig):
    if method == "mcts":
        node = best_answer_node(tree, cfg.select_by)
    else:
        answered = [n for n in tree.nodes if n.terminal_reason == "answer" and n.value is not None]
        node = max(answered, key=lambda n: n.value, default=None)
    return node


def progress_event(i: int, tree: Tree, method: str, cfg: SearchConfig, elapsed: float) -> search_pb2.SolveEvent:
    pr = search_pb2.SolveProgress(iterations_done=i, nodes=len(tree.nodes), elapsed_s=elapsed,
                                  iterations_total=cfg.iterations if method == "mcts" else cfg.max_depth)
    node = _answer_so_far(tree, method, cfg)
    if node is not None and node.answer is not None:
        pr.best_answer = node.answer
        if node.value is not None:
            pr.best_value = node.value
    return search_pb2.SolveEvent(progress=pr)


def response_from_tree(tree: Tree, method: str, include_tree: bool, duration_s: float) -> search_pb2.SolveResponse:
    """The chosen path (root excluded) with per-step values, and a summary of the tree."""
    meta = tree.meta
    resp = search_pb2.SolveResponse(method=method, checkpoint=str(meta.get("checkpoint") or ""),
                                    duration_s=duration_s, question_id=tree.question_id or "",
                                    sandbox_backend=str(meta.get("sandbox_backend") or ""))
    if meta.get("answer") is not None:
        resp.answer = str(meta["answer"])
    if meta.get("value") is not None:
        resp.value = float(meta["value"])
    if meta.get("correct") is not None:
        resp.correct = bool(meta["correct"])
    node_id = meta.get("answer_node")
    for n in tree.path(node_id) if node_id is not None else []:
        s = search_pb2.SolutionStep(text=n.text, kind=n.kind, code_error=n.code_error)
        if n.code is not None:
            s.code = n.code
        if n.output is not None:
            s.output = n.output
        if n.value is not None:
            s.value = n.value
        if n.N:
            s.q = n.Q
        resp.steps.append(s)
    summary = resp.tree
    summary.nodes = len(tree.nodes)
    summary.depth = max(n.depth for n in tree.nodes)
    summary.terminal_nodes = sum(1 for n in tree.nodes if n.terminal)
    summary.root_visits = tree.root.N
    if include_tree:
        summary.tree_json = tree.to_json()
    return resp


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    """Solve / SolveStream / GenerateTrees over remote policy, value and sandbox services.

    `publisher`: any object with `publish(tree, checkpoint: str, search_config: dict)` that
    returns once the broker acknowledged (GenerateTrees reports a question only after that).
    """

    def __init__(self, deps: Dependencies, config: SearchServerConfig | None = None, publisher=None,
                 metrics: SearchMetrics | None = None, check=None):
        self.deps, self.config, self.publisher, self.check = deps, config or SearchServerConfig(), publisher, check
        self.metrics = metrics or SearchMetrics(ServiceMetrics("search"))
        self.admission = Admission("search", "searches", self.config.max_active, self.config.max_queued,
                                   self.metrics.queued, self.metrics.active)

    # -- request handling ----------------------------------------------------------------------
    def _parse(self, req: search_pb2.SolveRequest) -> Parsed:
        """Every field checked against what the trainer's store accepts (alphamath.limits): a bad
        value is INVALID_ARGUMENT naming the field, before any search work."""
        question = check_question(req.question)
        check_text("question", question)
        method = method_from_pb(req.method)
        cfg = config_from_parameters(req.parameters, self.config.defaults)
        gt = check_text("ground_truth", req.ground_truth, GROUND_TRUTH_CHARS) if req.HasField("ground_truth") else None
        qid = check_id("question_id", req.question_id) if req.HasField("question_id") else None
        return Parsed(question, method, cfg, gt, qid, req.include_tree)

    def _scope(self, context) -> CallScope:
        """The request's deadline (capped by max_request_s), cancelled when the RPC ends."""
        rem = context.time_remaining()
        limit = self.config.max_request_s if rem is None else min(rem, self.config.max_request_s)
        scope = CallScope.with_timeout(limit)
        context.add_callback(scope.cancel)
        return scope

    def _search(self, p: Parsed, scope: CallScope, on_progress=None) -> Tree:
        policy, value, sandbox = self.deps.bind(scope)

        def progress(i: int, tree: Tree) -> None:
            scope.check()  # stop between simulations once the client is gone or out of time
            if on_progress is not None:
                on_progress(i, tree)

        start = time.perf_counter()
        try:
            tree = solve(p.question, p.method, policy, value, sandbox, p.cfg, ground_truth=p.ground_truth,
                         question_id=p.question_id, on_progress=progress, check=self.check, rewards=p.rewards)
        except ValueError as e:  # the request was validated already: this is a server-side fault
            raise RuntimeError(f"search failed: {e}") from e
        tree.meta["checkpoint"] = scope.checkpoint
        self.metrics.latency.labels(p.method).observe(time.perf_counter() - start)
        self.metrics.nodes.labels(p.method).observe(len(tree.nodes))
        return tree

    def _fail(self, context, rpc: str, method: str, exc: BaseException):
        """Map an exception to a status code (and count it); never returns."""
        code, msg = status_for(exc, "search")
        self.metrics.outcomes.labels(method or "unknown", code.name).inc()
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed", rpc, exc_info=exc)
        else:
            log.info("%s -> %s: %s", rpc, code.name, msg)
        context.abort(code, msg)

    # -- RPCs ------------------------------------------------------------------------------------
    def Solve(self, request, context):
        try:
            p = self._parse(request)
        except ValueError as e:
            self._fail(context, "Solve", "", e)
        scope = self._scope(context)
        start = time.perf_counter()
        try:
            with self.admission.slot(scope.check, deadline=scope.deadline):
                tree = self._search(p, scope)
        except Exception as e:  # noqa: BLE001 - mapped to a status code
            self._fail(context, "Solve", p.method, e)
        self.metrics.outcomes.labels(p.method, "OK").inc()
        return response_from_tree(tree, p.method, p.include_tree, time.perf_counter() - start)

    def SolveStream(self, request, context):
        """Progress events from the search thread are relayed through a queue; the result last."""
        try:
            p = self._parse(request)
        except ValueError as e:
            self._fail(context, "SolveStream", "", e)
        scope = self._scope(context)
        events: queue.Queue = queue.Queue()
        start = time.perf_counter()

        def on_progress(i, tree):
            events.put(progress_event(i, tree, p.method, p.cfg, time.perf_counter() - start))

        def work():
            try:
                with self.admission.slot(scope.check, deadline=scope.deadline):
                    events.put(self._search(p, scope, on_progress))
            except BaseException as e:  # noqa: BLE001 - relayed to the handler thread
                events.put(e)

        threading.Thread(target=work, name="search-stream", daemon=True).start()
        while True:
            item = events.get()
            if isinstance(item, BaseException):
                self._fail(context, "SolveStream", p.method, item)
            if isinstance(item, Tree):
                self.metrics.outcomes.labels(p.method, "OK").inc()
                yield search_pb2.SolveEvent(
                    result=response_from_tree(item, p.method, p.include_tree, time.perf_counter() - start))
                return
            yield item

    def GenerateTrees(self, request, context):
        """MCTS with ground truth over a batch; each tree is published before its result is sent."""
        try:
            batch = self._parse_batch(request)
        except ValueError as e:
            self._fail(context, "GenerateTrees", "mcts", e)
        scope = self._scope(context)
        cfg = batch[0].cfg
        concurrency = min(request.concurrency or self.config.batch_concurrency, self.config.max_active, len(batch))

        def one(p: Parsed) -> search_pb2.GenerateTreesResult:
            out = search_pb2.GenerateTreesResult(question_id=p.question_id)
            start = time.perf_counter()
            qscope = scope.child()
            try:
                with self.admission.slot(qscope.check, bounded=False, deadline=qscope.deadline):
                    tree = self._search(p, qscope)
            except (RequestCancelled, RequestDeadlineExceeded):
                raise
            except Exception as e:  # noqa: BLE001 - one failed question does not end the batch
                out.error = status_for(e, "search")[1]
                log.warning("GenerateTrees question %s failed: %s", p.question_id, out.error)
                return out
            out.result.CopyFrom(response_from_tree(tree, "mcts", p.include_tree, time.perf_counter() - start))
            if self.publisher is not None:
                try:
                    self.publisher.publish(tree, qscope.checkpoint, cfg.to_dict())
                    out.published = True
                    self.metrics.published.labels("acked").inc()
                except Exception as e:  # noqa: BLE001 - reported per question
                    out.error = f"publishing the tree failed: {e}"
                    self.metrics.published.labels("failed").inc()
                    log.error("publishing tree of %s failed: %s", p.question_id, e)
            return out

        pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="generate-trees")
        try:
            futures = [pool.submit(one, p) for p in batch]
            for fut in as_completed(futures):
                try:
                    result = fut.result()
                except Exception as e:  # noqa: BLE001 - cancellation / deadline of the whole batch
                    self._fail(context, "GenerateTrees", "mcts", e)
                yield result
            self.metrics.outcomes.labels("mcts", "OK").inc()
        finally:
            scope.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    def _parse_batch(self, request) -> list[Parsed]:
        qs = request.questions
        if not qs:
            raise ValueError("questions is empty")
        if len(qs) > MAX_BATCH_QUESTIONS:
            raise ValueError(f"{len(qs)} questions; the limit per GenerateTrees call is {MAX_BATCH_QUESTIONS}")
        cfg = config_from_parameters(request.parameters, self.config.defaults)
        out, seen = [], {}
        for i, q in enumerate(qs):
            try:
                question = check_text("question", check_question(q.question))
                check_id("id", q.id, required=False)
                check_text("ground_truth", q.ground_truth, GROUND_TRUTH_CHARS)
            except ValueError as e:
                raise ValueError(f"questions[{i}].{e}") from None
            if not q.ground_truth.strip():
                raise ValueError(f"questions[{i}].ground_truth is empty (GenerateTrees needs the final answer)")
            qid = q.id or f"q{i}"
            if qid in seen:  # results are reported by id: two questions must not share one
                raise ValueError(f"questions[{i}].id {qid!r} repeats questions[{seen[qid]}].id")
            seen[qid] = i
            out.append(Parsed(question, "mcts", cfg, q.ground_truth, qid, request.include_tree, rewards=True))
        return out


class SearchServer:
    """A running search service: gRPC (with health, reflection) plus its /metrics endpoint."""

    def __init__(self, *, policy_addr: str, value_addr: str, sandbox_addr: str, port: int = 0,
                 host: str = "127.0.0.1", metrics_port: int = -1, config: SearchServerConfig | None = None,
                 retry: RetryPolicy | None = None, publisher=None, check=None, max_workers: int = 0):
        self.config = config or SearchServerConfig()
        self.base_metrics = ServiceMetrics("search")
        self.metrics = SearchMetrics(self.base_metrics)
        self.deps = Dependencies.connect(policy_addr, value_addr, sandbox_addr, retry=retry,
                                         metrics=self.metrics.dependency_call)
        self.servicer = SearchServicer(self.deps, self.config, publisher, self.metrics, check)
        name = search_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name
        # Every running or queued search holds a handler thread; keep headroom for health checks.
        workers = max(max_workers, self.config.max_active + self.config.max_queued + 16)
        self.grpc = GrpcServer(lambda s: search_pb2_grpc.add_SearchServiceServicer_to_server(self.servicer, s),
                               [name], port=port, host=host, metrics=self.base_metrics, max_workers=workers)
        self.port = self.grpc.port
        self.metrics_port = self.base_metrics.serve(metrics_port, host) if metrics_port >= 0 else None

    def stop(self, grace: float | None = 5.0) -> None:
        self.grpc.stop(grace)
        self.base_metrics.stop()
        self.deps.close()
        close = getattr(self.servicer.publisher, "close", None)
        if close is not None:
            close()

