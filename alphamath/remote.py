"""gRPC clients of the Policy, Value and Sandbox protocols (alphamath.interfaces): the remote
backends beside the local ones (alphamath.local, the sandbox executor). Search uses all three, the
promotion job the sandbox.

They implement the `Policy` / `Value` / `Sandbox` protocols of `alphamath.interfaces`, so the
synchronous search engine runs unchanged against remote services. Every call

  * is bounded by a per-call timeout and by the deadline of the search request it serves;
  * is retried with capped exponential backoff (and jitter) while the dependency answers
    UNAVAILABLE or RESOURCE_EXHAUSTED, for at most `retry_budget_s`; after that the search fails
    with `DependencyUnavailable` (the search server maps it to UNAVAILABLE) instead of hanging;
  * is cancelled when the search request is cancelled (client gone, deadline passed).

A `CallScope` carries one request's deadline and cancellation; `Dependencies.bind(scope)` gives
protocol objects tied to it. Channels are shared by all requests (one HTTP/2 connection per
dependency, multiplexed), and are configured to reconnect quickly after a dependency restarts.
"""
from __future__ import annotations

import os
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import grpc

from alphamath.convert import completions_from_pb
from alphamath.interfaces import ExecResult, Sample
from alphamath.pb import policy_pb2, policy_pb2_grpc, sandbox_pb2, sandbox_pb2_grpc, value_pb2, value_pb2_grpc
from alphamath.service import DependencyError, DependencyUnavailable, RequestCancelled, RequestDeadlineExceeded  # noqa: F401 - raised here

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)

# Fast reconnects: gRPC's default reconnect backoff grows to 120 s, far longer than a restart.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


@dataclass
class RetryPolicy:
    """How long one dependency call may take and how long an unavailable dependency is retried."""

    call_timeout_s: float = 120.0
    retry_budget_s: float = 10.0
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    multiplier: float = 2.0

    @classmethod
    def from_env(cls, prefix: str = "ALPHAMATH_", **overrides) -> "RetryPolicy":
        """ALPHAMATH_DEP_RETRY_BUDGET_S and ALPHAMATH_DEP_CALL_TIMEOUT_S override the defaults."""
        p = cls(**overrides)
        if v := os.environ.get(f"{prefix}DEP_RETRY_BUDGET_S"):
            p.retry_budget_s = float(v)
        if v := os.environ.get(f"{prefix}DEP_CALL_TIMEOUT_S"):
            p.call_timeout_s = float(v)
        return p


class CallScope:
    """Deadline and cancellation of one search request, shared by every call it makes.

    `cancel()` may come from any thread (gRPC's termination callback); in-flight calls are
    cancelled at once, later calls fail fast with RequestCancelled.
    """

    def __init__(self, deadline: float | None = None):
        self.deadline = deadline  # time.monotonic() value, or None for no deadline
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._inflight: set = set()
        self._children: list[CallScope] = []
        self.checkpoint: str = ""  # checkpoint reported by the policy service
        self.calls: dict[str, int] = {}
        self.retries = 0

    @classmethod
    def with_timeout(cls, seconds: float | None) -> "CallScope":
        return cls(None if seconds is None else time.monotonic() + seconds)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check(self) -> None:
        """Raise if the request should stop; search calls this between simulations."""
        if self._cancelled.is_set():
            raise RequestCancelled("the client cancelled the request")
        rem = self.remaining()
        if rem is not None and rem <= 0:
            raise RequestDeadlineExceeded("the request deadline passed")

    def cancel(self) -> None:
        self._cancelled.set()
        with self._lock:
            futures, children = list(self._inflight), list(self._children)
        for f in futures:
            f.cancel()
        for c in children:
            c.cancel()

    def child(self) -> "CallScope":
        """A scope with the same deadline, cancelled with this one, but with its own record of
        calls and checkpoint (one per question of a GenerateTrees batch)."""
        c = CallScope(self.deadline)
        with self._lock:
            self._children.append(c)
        if self._cancelled.is_set():
            c.cancel()
        return c

    def sleep(self, seconds: float) -> None:
        """Back off, waking early on cancellation."""
        self._cancelled.wait(seconds)

    def _track(self, fut) -> None:
        with self._lock:
            self._inflight.add(fut)
        if self._cancelled.is_set():
            fut.cancel()

    def _untrack(self, fut) -> None:
        with self._lock:
            self._inflight.discard(fut)


def _call(service: str, addr: str, method, request, retry: RetryPolicy, scope: CallScope,
          metrics=None):
    """One unary call with deadline, cancellation and retry-with-backoff on transient codes."""
    start = time.monotonic()
    backoff = retry.initial_backoff_s
    first_failure = None
    while True:
        scope.check()
        timeout = retry.call_timeout_s
        rem = scope.remaining()
        if rem is not None:
            timeout = min(timeout, rem)
        fut = method.future(request, timeout=timeout)
        scope._track(fut)
        try:
            result = fut.result()
            scope.calls[service] = scope.calls.get(service, 0) + 1
            if metrics:
                metrics(service, "OK", time.monotonic() - start)
            return result
        except grpc.FutureCancelledError:
            scope.check()
            raise RequestCancelled(f"call to {service} cancelled") from None
        except grpc.RpcError as e:
            code = e.code()
            if metrics:
                metrics(service, code.name, None)
            if code == grpc.StatusCode.CANCELLED and scope.cancelled:
                raise RequestCancelled(f"call to {service} cancelled") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                scope.check()  # the request's own deadline -> RequestDeadlineExceeded
                raise DependencyUnavailable(service, addr, time.monotonic() - start,
                                            f"no answer within the per-call timeout of {timeout:.1f} s") from None
            if code not in RETRYABLE:
                raise DependencyError(service, addr, code, e.details() or "") from None
            now = time.monotonic()
            if first_failure is None:  # the budget counts from the first failure, not the call's start
                first_failure = now
            waited = now - first_failure
            sleep = min(backoff, retry.max_backoff_s) * random.uniform(0.5, 1.0)
            if waited + sleep > retry.retry_budget_s:
                raise DependencyUnavailable(service, addr, waited,
                                            f"{code.name}: {e.details() or 'no details'}") from None
            if rem is not None and sleep >= scope.remaining():
                raise RequestDeadlineExceeded(
                    f"the request deadline passed while {service} was {code.name}") from None
            scope.retries += 1
            scope.sleep(sleep)
            backoff *= retry.multiplier
        finally:
            scope._untrack(fut)


@dataclass
class Endpoint:
    service: str
    addr: str
    channel: grpc.Channel
    retry: RetryPolicy
    metrics: object = None

    def call(self, method, request, scope: CallScope):
        return _call(self.service, self.addr, method, request, self.retry, scope, self.metrics)


class RemotePolicy:
    """Policy protocol over PolicyService; round-0 prompts are cached (they depend only on the
    question and the prompt template)."""

    _prompt_cache: "OrderedDict[str, str]"

    def __init__(self, ep: Endpoint, scope: CallScope | None = None, prompt_cache=None, lock=None):
        self.ep, self.scope = ep, scope or CallScope()
        self.stub = policy_pb2_grpc.PolicyServiceStub(ep.channel)
        self._prompt_cache = prompt_cache if prompt_cache is not None else OrderedDict()
        self._lock = lock or threading.Lock()

    def bind(self, scope: CallScope) -> "RemotePolicy":
        return RemotePolicy(self.ep, scope, self._prompt_cache, self._lock)

    def render_prompt(self, question: str) -> str:
        with self._lock:
            if question in self._prompt_cache:
                self._prompt_cache.move_to_end(question)
                return self._prompt_cache[question]
        resp = self.ep.call(self.stub.RenderPrompt, policy_pb2.RenderPromptRequest(question=question), self.scope)
        with self._lock:
            self._prompt_cache[question] = resp.prompt
            while len(self._prompt_cache) > 1024:
                self._prompt_cache.popitem(last=False)
        return resp.prompt

    def generate(self, prompts: Sequence[str], n: int, *, stop: Sequence[str], temperature: float,
                 top_p: float = 1.0, max_new_tokens: int = 256, seed: int | None = None) -> list[list[Sample]]:
        req = policy_pb2.GenerateRequest(prompts=list(prompts), n=n, stop=list(stop), temperature=temperature,
                                         top_p=top_p, max_new_tokens=max_new_tokens)
        if seed is not None:
            req.seed = seed % 2**64
        resp = self.ep.call(self.stub.Generate, req, self.scope)
        if resp.checkpoint:
            self.scope.checkpoint = resp.checkpoint
        if len(resp.completions) != len(prompts):
            raise DependencyError(self.ep.service, self.ep.addr, grpc.StatusCode.INTERNAL,
                                  f"{len(resp.completions)} completions for {len(prompts)} prompts")
        try:
            return completions_from_pb(resp)
        except ValueError as e:
            raise DependencyError(self.ep.service, self.ep.addr, grpc.StatusCode.INTERNAL, str(e)) from None

    def info(self):
        return self.ep.call(self.stub.Info, policy_pb2.InfoRequest(), self.scope)


class RemoteValue:
    """Value protocol over ValueService."""

    def __init__(self, ep: Endpoint, scope: CallScope | None = None):
        self.ep, self.scope = ep, scope or CallScope()
        self.stub = value_pb2_grpc.ValueServiceStub(ep.channel)

    def bind(self, scope: CallScope) -> "RemoteValue":
        return RemoteValue(self.ep, scope)

    def score(self, states: Sequence[str]) -> list[float]:
        if not states:
            return []
        resp = self.ep.call(self.stub.Score, value_pb2.ScoreRequest(states=list(states)), self.scope)
        if len(resp.values) != len(states):
            raise DependencyError(self.ep.service, self.ep.addr, grpc.StatusCode.INTERNAL,
                                  f"{len(resp.values)} values for {len(states)} states")
        return [float(v) for v in resp.values]


class RemoteSandbox:
    """Sandbox protocol over SandboxService (server-side default limits).

    `backend` names the sandbox backend(s) that ran this scope's code, as the responses said; with
    no code run yet, what the service's Info RPC says."""

    def __init__(self, ep: Endpoint, scope: CallScope | None = None):
        self.ep, self.scope = ep, scope or CallScope()
        self.stub = sandbox_pb2_grpc.SandboxServiceStub(ep.channel)
        self.backends_seen: list[str] = []

    def bind(self, scope: CallScope) -> "RemoteSandbox":
        return RemoteSandbox(self.ep, scope)

    @property
    def backend(self) -> str:
        if self.backends_seen:
            return "+".join(self.backends_seen)
        return self.ep.call(self.stub.Info, sandbox_pb2.SandboxInfoRequest(), self.scope).backend

    def execute(self, cells: Sequence[str]) -> ExecResult:
        resp = self.ep.call(self.stub.Execute, sandbox_pb2.ExecuteRequest(cells=list(cells)), self.scope)
        if resp.backend not in self.backends_seen:
            self.backends_seen.append(resp.backend)
        return ExecResult(stdout=resp.stdout, error=resp.error if resp.HasField("error") else None,
                          timed_out=resp.timed_out, duration_s=resp.duration_s, backend=resp.backend)


@dataclass
class Dependencies:
    """The three remote neighbours of one search server, sharing channels across requests."""

    policy: RemotePolicy
    value: RemoteValue
    sandbox: RemoteSandbox
    channels: list = field(default_factory=list)

    @classmethod
    def connect(cls, policy_addr: str, value_addr: str, sandbox_addr: str,
                retry: RetryPolicy | None = None, sandbox_retry: RetryPolicy | None = None,
                metrics=None) -> "Dependencies":
        """`metrics(service, code_name, seconds_or_None)` is called after every attempt."""
        retry = retry or RetryPolicy()
        sandbox_retry = sandbox_retry or RetryPolicy(call_timeout_s=60.0, retry_budget_s=retry.retry_budget_s)
        eps = []
        for name, addr, r in (("policy", policy_addr, retry), ("value", value_addr, retry),
                              ("sandbox", sandbox_addr, sandbox_retry)):
            eps.append(Endpoint(name, addr, grpc.insecure_channel(addr, options=CHANNEL_OPTIONS), r, metrics))
        return cls(RemotePolicy(eps[0]), RemoteValue(eps[1]), RemoteSandbox(eps[2]),
                   [e.channel for e in eps])

    def bind(self, scope: CallScope) -> tuple[RemotePolicy, RemoteValue, RemoteSandbox]:
        return self.policy.bind(scope), self.value.bind(scope), self.sandbox.bind(scope)

    @property
    def addrs(self) -> dict[str, str]:
        return {"policy": self.policy.ep.addr, "value": self.value.ep.addr, "sandbox": self.sandbox.ep.addr}

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
