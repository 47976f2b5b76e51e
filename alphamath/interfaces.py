"""The three functions search is parameterised by (as in mctx): policy, value, sandbox.

Search code only sees these protocols. In-process they are backed by the local model and the
gVisor executor; in the services they are gRPC clients with the same signatures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass
class Sample:
    """One sampled continuation of a prompt.

    `text` is the generated text; when finish_reason == "stop" it ends with the matched stop
    string (as TGI returns it). The step's prior is exp(cumulative_logprob / token_count).
    """

    text: str
    token_count: int
    cumulative_logprob: float
    finish_reason: str  # "stop" (a stop string matched) | "eos" | "length"


@dataclass
class ExecResult:
    """What running the code cells of one path printed; `error` is the last traceback line;
    `backend` names the sandbox that ran it (e.g. "runsc", "pod"), so results say how they were made."""

    stdout: str
    error: str | None = None
    timed_out: bool = False
    duration_s: float = 0.0
    backend: str | None = None


class Policy(Protocol):
    def render_prompt(self, question: str) -> str:
        """The round-0 prompt (few-shot, chat template) that every state of `question` starts with."""
        ...

    def generate(
        self,
        prompts: Sequence[str],
        n: int,
        *,
        stop: Sequence[str],
        temperature: float,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int | Sequence[int | None] | None = None,
    ) -> list[list[Sample]]:
        """n samples per prompt; temperature 0 means greedy (then n samples are identical).
        `seed` is one for all prompts or one per prompt (so batched requests keep their own)."""
        ...


class Value(Protocol):
    def score(self, states: Sequence[str]) -> list[float]:
        """Value-head estimates in [-1, 1] of full states (prompt + steps so far)."""
        ...


class Sandbox(Protocol):
    backend: str  # which sandbox backend runs the code; recorded in every tree's meta

    def execute(self, cells: Sequence[str]) -> ExecResult:
        """Run the code cells of one path in order; return what the last cell printed."""
        ...


@dataclass
class Usage:
    """Token accounting of a model backend: tokens computed by forward passes."""

    prefill_tokens: int = 0
    decode_tokens: int = 0  # every position a decode step fed, drafts included
    draft_tokens: int = 0  # of those, positions fed a draft token (lm/lookup.py), accepted or not
    draft_accepted: int = 0  # of those, draft tokens the samples drew (the rest was computed for nothing)
    calls: dict = field(default_factory=dict)

    @property
    def computed(self) -> int:
        return self.prefill_tokens + self.decode_tokens
