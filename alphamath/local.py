"""The in-process backends of the Policy and Value protocols: both on one shared `LocalLM`, so a
state's value is read from the KV its decoding already built. The policy and value services serve
these; the CLI, the trainer's round and the benchmarks use them in-process."""
from __future__ import annotations

import math
from typing import Sequence

from alphamath import steps
from alphamath.interfaces import Sample, Usage


class LocalPolicy:
    """The Policy protocol on a `LocalLM` (prefix-cached, batched decoding); shares the LM with LocalValue."""

    def __init__(self, lm):
        self.lm = lm

    @property
    def usage(self) -> Usage:
        return self.lm.usage

    def render_prompt(self, question: str) -> str:
        return steps.render_prompt(question, self.lm.tokenizer)

    def generate(self, prompts: Sequence[str], n: int, *, stop: Sequence[str], temperature: float,
                 top_p: float = 1.0, max_new_tokens: int = 256, seed: int | None = None) -> list[list[Sample]]:
        return self.lm.generate(prompts, n, stop=stop, temperature=temperature, top_p=top_p,
                                max_new_tokens=max_new_tokens, seed=seed)


class LocalValue:
    """The Value protocol on a `LocalLM`: siblings share their parent's cached prefix."""

    def __init__(self, lm):
        self.lm = lm

    @property
    def usage(self) -> Usage:
        return self.lm.usage

    def score(self, states: Sequence[str]) -> list[float]:
        return self.lm.score(states)

    @property
    def constant(self) -> float | None:
        """tanh(bias) when the head's weights are all zero (an untrained head says the same of every
        state), else None: judging such a head needs no forward pass (alphamath.metrics.value_report)."""
        head = self.lm.model.value_head
        if bool(head.weight.detach().ne(0).any()):
            return None
        return math.tanh(float(head.bias.detach().float().sum()))
