"""ValueService: the value head behind search, batched across concurrent searches.

States from many searches are gathered into one `Value.score` call (same Batcher as policy_svc).
Sibling states share their parent's prefix; LocalLM's prefix KV cache computes that prefix once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from alphamath.batcher import Batcher
from alphamath.convert import model_info
from alphamath.interfaces import Value
from alphamath.pb import value_pb2, value_pb2_grpc
from alphamath.service import GrpcServer, InvalidArgument, ServiceMetrics, abort_for
from alphamath.slot import ModelSlot

log = logging.getLogger(__name__)
SERVICE_NAME = value_pb2.DESCRIPTOR.services_by_name["ValueService"].full_name


@dataclass
class ValueLimits:
    max_states: int = 256
    max_input_chars: int = 32_000


@dataclass
class LoadedValue:
    value: Value
    model_id: str
    checkpoint: str
    path: str = ""
    backend: str = "local"
    dtype: str = ""


class ValueServicer(value_pb2_grpc.ValueServiceServicer):
    def __init__(self, loaded: LoadedValue, *, metrics: ServiceMetrics | None = None,
                 limits: ValueLimits | None = None, max_batch_size: int = 128, window_s: float = 0.005,
                 max_queue: int = 256):
        self.limits = limits or ValueLimits()
        self.metrics = metrics or ServiceMetrics("value")
        self.max_batch_size = max_batch_size
        self.batcher = Batcher(self._run_batch, max_batch_size=max_batch_size, window_s=window_s,
                               max_queue=max_queue, name="value", depth_gauge=self.metrics.queue_depth("value"),
                               on_batch=self.metrics.observe_batch)
        self.slot = ModelSlot(loaded, on_swap=self.metrics.publish_model, name="value")

    @property
    def loaded(self) -> LoadedValue:
        return self.slot.current()

    def _run_batch(self, _key, payloads: list[list[str]]) -> list[list[float]]:
        states = [s for batch in payloads for s in batch]
        values = self.loaded.value.score(states)
        if len(values) != len(states):
            raise RuntimeError(f"value backend returned {len(values)} values for {len(states)} states")
        out, i = [], 0
        for batch in payloads:
            out.append([max(-1.0, min(1.0, float(v))) for v in values[i:i + len(batch)]])
            i += len(batch)
        return out

    def score(self, states: Sequence[str], timeout: float | None = None, on_cancel=None) -> list[float]:
        """Validated, batched scoring. Raises InvalidArgument, Overloaded, TimeoutError."""
        if not states:
            raise InvalidArgument("states must not be empty")
        if len(states) > self.limits.max_states:
            raise InvalidArgument(f"at most {self.limits.max_states} states per call, got {len(states)}")
        for i, s in enumerate(states):
            if not s:
                raise InvalidArgument(f"states[{i}] is empty")
            if len(s) > self.limits.max_input_chars:
                raise InvalidArgument(f"states[{i}] has {len(s)} characters; the limit is {self.limits.max_input_chars}")
        return self.batcher(None, list(states), size=len(states), timeout=timeout, on_cancel=on_cancel)

    def Score(self, request, context):
        try:
            values = self.score(list(request.states), timeout=context.time_remaining(),
                                on_cancel=lambda cb: context.add_callback(cb))
        except Exception as e:  # noqa: BLE001 - mapped to a status code
            abort_for(context, e, log)
        return value_pb2.ScoreResponse(values=values, checkpoint=self.loaded.checkpoint)

    def Info(self, request, context):
        return model_info(self.loaded, max_batch_size=self.max_batch_size, max_input_chars=self.limits.max_input_chars)

    def close(self) -> None:
        self.batcher.close()


class ValueServer:
    """ValueService on gRPC plus its metrics endpoint."""

    def __init__(self, loaded: LoadedValue, *, host: str = "0.0.0.0", port: int = 50052, metrics_port: int = -1,
                 max_workers: int = 64, metrics: ServiceMetrics | None = None, **servicer_kw):
        self.metrics = metrics or ServiceMetrics("value")
        self.servicer = ValueServicer(loaded, metrics=self.metrics, **servicer_kw)
        self.grpc = GrpcServer(lambda s: value_pb2_grpc.add_ValueServiceServicer_to_server(self.servicer, s),
                               [SERVICE_NAME], port=port, host=host, metrics=self.metrics, max_workers=max_workers)
        self.port = self.grpc.port
        self.metrics_port = self.metrics.serve(metrics_port, host) if metrics_port >= 0 else None

    def stop(self, grace: float = 5.0) -> None:
        self.grpc.stop(grace)
        self.servicer.close()
        self.metrics.stop()
