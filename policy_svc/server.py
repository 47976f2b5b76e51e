"""PolicyService: the policy LLM behind search, with dynamic batching across concurrent searches.

Requests with the same generation parameters (n, stop, temperature, top_p, max_new_tokens, seed)
that arrive within the batching window share one `Policy.generate` call. LocalLM derives each
sample's seed from (seed, k, prompt), so a seeded request gets the same samples whether it runs
alone or in a batch; requests with different seeds are batched separately.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import grpc

from alphamath import convert
from alphamath.batcher import Batcher
from alphamath.interfaces import Policy, Sample
from alphamath.pb import common_pb2, policy_pb2, policy_pb2_grpc
from alphamath.service import GrpcServer, InvalidArgument, ServiceMetrics, abort_for
from alphamath.slot import ModelSlot

log = logging.getLogger(__name__)
SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class PolicyLimits:
    """What one Generate call may ask for; beyond these the answer is INVALID_ARGUMENT."""

    max_prompts: int = 64
    max_n: int = 64
    max_input_chars: int = 32_000
    max_new_tokens: int = 2048
    max_stop: int = 8
    max_stop_chars: int = 64
    max_question_chars: int = 8_000


@dataclass
class LoadedPolicy:
    """A policy backend and what it serves; swapped whole when a checkpoint is rolled out."""

    policy: Policy
    model_id: str
    checkpoint: str
    path: str = ""
    backend: str = "local"
    dtype: str = ""
    lm: object | None = None  # LocalLM when local: the TGI HTTP API reads token details from it
    extra: dict = field(default_factory=dict)


def validate_generate(limits: PolicyLimits, prompts: Sequence[str], n: int, stop: Sequence[str],
                      temperature: float, top_p: float, max_new_tokens: int) -> None:
    """Raise InvalidArgument naming the offending field."""
    if not prompts:
        raise InvalidArgument("prompts must not be empty")
    if len(prompts) > limits.max_prompts:
        raise InvalidArgument(f"at most {limits.max_prompts} prompts per call, got {len(prompts)}")
    for i, p in enumerate(prompts):
        if not p:
            raise InvalidArgument(f"prompts[{i}] is empty")
        if len(p) > limits.max_input_chars:
            raise InvalidArgument(f"prompts[{i}] has {len(p)} characters; the limit is {limits.max_input_chars}")
    if not 1 <= n <= limits.max_n:
        raise InvalidArgument(f"n must be in [1, {limits.max_n}], got {n}")
    if len(stop) > limits.max_stop:
        raise InvalidArgument(f"at most {limits.max_stop} stop strings, got {len(stop)}")
    for i, s in enumerate(stop):
        if not s or len(s) > limits.max_stop_chars:
            raise InvalidArgument(f"stop[{i}] must have 1 to {limits.max_stop_chars} characters")
    if not (math.isfinite(temperature) and 0.0 <= temperature <= 5.0):
        raise InvalidArgument(f"temperature must be in [0, 5] (0 is greedy), got {temperature}")
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise InvalidArgument(f"top_p must be in (0, 1], got {top_p}")
    if not 1 <= max_new_tokens <= limits.max_new_tokens:
        raise InvalidArgument(f"max_new_tokens must be in [1, {limits.max_new_tokens}], got {max_new_tokens}")


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    """Validates, batches and runs generation; also used by the TGI-compatible HTTP API."""

    def __init__(self, loaded: LoadedPolicy, *, metrics: ServiceMetrics | None = None,
                 limits: PolicyLimits | None = None, max_batch_size: int = 64, window_s: float = 0.005,
                 max_queue: int = 256, workers: int = 1):
        self.limits = limits or PolicyLimits()
        self.metrics = metrics or ServiceMetrics("policy")
        self.max_batch_size = max_batch_size
        self.batcher = Batcher(self._run_batch, max_batch_size=max_batch_size, window_s=window_s,
                               max_queue=max_queue, name="policy", workers=workers,
                               depth_gauge=self.metrics.queue_depth("policy"),
                               on_batch=self.metrics.observe_batch)
        self.slot = ModelSlot(loaded, on_swap=self.metrics.publish_model, name="policy")

    # ------------------------------------------------------------ model in use

    @property
    def loaded(self) -> LoadedPolicy:
        return self.slot.current()

    def info(self) -> common_pb2.ModelInfo:
        lim = self.limits
        return convert.model_info(self.loaded, max_batch_size=self.max_batch_size, max_input_chars=lim.max_input_chars,
                          max_new_tokens=lim.max_new_tokens, max_n=lim.max_n)

    # ------------------------------------------------------------ generation

    def _run_batch(self, key, payloads: list[tuple[list[str], int | None]]) -> list[list[list[Sample]]]:
        """Requests that differ only in seed share one batch: each prompt keeps its own seed."""
        n, stop, temperature, top_p, max_new_tokens = key
        prompts = [p for batch, _ in payloads for p in batch]
        seeds = [seed for batch, seed in payloads for _ in batch]
        out = self.loaded.policy.generate(prompts, n, stop=list(stop), temperature=temperature, top_p=top_p,
                                           max_new_tokens=max_new_tokens,
                                           seed=seeds[0] if len(set(seeds)) == 1 else seeds)
        if len(out) != len(prompts):
            raise RuntimeError(f"backend returned {len(out)} results for {len(prompts)} prompts")
        results, i = [], 0
        for batch, _ in payloads:
            results.append(out[i:i + len(batch)])
            i += len(batch)
        return results

    def generate(self, prompts: Sequence[str], n: int, *, stop: Sequence[str] = (), temperature: float,
                 top_p: float = 1.0, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, seed: int | None = None,
                 timeout: float | None = None, on_cancel=None) -> list[list[Sample]]:
        """Validated, batched generation. Raises InvalidArgument, Overloaded, TimeoutError."""
        validate_generate(self.limits, prompts, n, stop, temperature, top_p, max_new_tokens)
        if temperature == 0:
            seed = None  # greedy ignores the seed: let all greedy requests share batches
        key = (n, tuple(stop), float(temperature), float(top_p), int(max_new_tokens))
        return self.batcher(key, (list(prompts), seed), size=len(prompts) * (1 if temperature == 0 else n),
                            timeout=timeout, on_cancel=on_cancel)

    # ------------------------------------------------------------ gRPC

    def Generate(self, request, context):
        try:
            results = self.generate(
                list(request.prompts), request.n, stop=list(request.stop), temperature=request.temperature,
                top_p=request.top_p if request.HasField("top_p") else 1.0,
                max_new_tokens=request.max_new_tokens if request.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS,
                seed=request.seed if request.HasField("seed") else None,
                timeout=context.time_remaining(), on_cancel=lambda cb: context.add_callback(cb))
        except Exception as e:  # noqa: BLE001 - mapped to a status code
            abort_for(context, e, log)
        decoded = sum(s.token_count for per_prompt in results for s in per_prompt)
        return policy_pb2.GenerateResponse(completions=convert.completions_to_pb(results),
                                           checkpoint=self.loaded.checkpoint,
                                           usage=common_pb2.Usage(decode_tokens=decoded))

    def RenderPrompt(self, request, context):
        q = request.question
        if not q.strip():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "question must not be empty")
        if len(q) > self.limits.max_question_chars:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"question has {len(q)} characters; the limit is {self.limits.max_question_chars}")
        return policy_pb2.RenderPromptResponse(prompt=self.loaded.policy.render_prompt(q))

    def Info(self, request, context):
        return self.info()

    def close(self) -> None:
        self.batcher.close()


class PolicyServer:
    """PolicyService on gRPC, its metrics endpoint and (optionally) the TGI-compatible HTTP API."""

    def __init__(self, loaded: LoadedPolicy, *, host: str = "0.0.0.0", port: int = 50051,
                 metrics_port: int = -1, http_port: int = -1, max_workers: int = 64,
                 metrics: ServiceMetrics | None = None, **servicer_kw):
        self.metrics = metrics or ServiceMetrics("policy")
        self.servicer = PolicyServicer(loaded, metrics=self.metrics, **servicer_kw)
        self.grpc = GrpcServer(lambda s: policy_pb2_grpc.add_PolicyServiceServicer_to_server(self.servicer, s),
                               [SERVICE_NAME], port=port, host=host, metrics=self.metrics,
                               max_workers=max_workers)
        self.port = self.grpc.port
        self.metrics_port = self.metrics.serve(metrics_port, host) if metrics_port >= 0 else None
        self.http = None
        self.http_port = None
        if http_port >= 0:
            from policy_svc.tgi import TGIHttpServer

            self.http = TGIHttpServer(self.servicer, host=host, port=http_port)
            self.http_port = self.http.port

    def stop(self, grace: float = 5.0) -> None:
        if self.http is not None:
            self.http.stop()
        self.grpc.stop(grace)
        self.servicer.close()
        self.metrics.stop()
