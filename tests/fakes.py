"""Deterministic neighbours for testing search arithmetic: a scripted policy, value and sandbox."""
from __future__ import annotations

import math

from alphamath.interfaces import ExecResult, Sample
from alphamath.steps import STEP_OPEN


def sample(text: str, prior: float = 0.5, tokens: int = 4, finish: str | None = None) -> Sample:
    """A sample whose prior exp(clp / tokens) is exactly `prior`."""
    if finish is None:
        finish = "stop" if text.endswith(("</step>", "</code>")) else "eos"
    return Sample(text=text, token_count=tokens, cumulative_logprob=math.log(prior) * tokens,
                  finish_reason=finish)


class ScriptedPolicy:
    """Children are looked up by the steps written so far (the prefix after the prompt)."""

    def __init__(self, script: dict[tuple[str, ...], list[Sample]], default: list[Sample] | None = None):
        self.script, self.default, self.calls = script, default, []

    def render_prompt(self, question: str) -> str:
        return f"Q: {question}\n{STEP_OPEN}"

    def generate(self, prompts, n, *, stop, temperature, top_p=1.0, max_new_tokens=256, seed=None):
        out = []
        for p in prompts:
            steps = tuple(s.split("</step>")[0].split("<code>")[0]
                          for s in p.split(STEP_OPEN)[1:-1])
            self.calls.append((steps, n, temperature))
            options = self.script.get(steps, self.default)
            if options is None:
                raise KeyError(f"no script for path {steps}")
            out.append([options[i % len(options)] for i in range(n)])
        return out


class ConstValue:
    def __init__(self, v: float = 0.0, by_text: dict[str, float] | None = None):
        self.v, self.by_text, self.calls = v, by_text or {}, 0

    def score(self, states):
        self.calls += len(states)
        out = []
        for s in states:
            last = s.split(STEP_OPEN)[-1]
            out.append(next((v for k, v in self.by_text.items() if k in last), self.v))
        return out


class ScriptedSandbox:
    """Prints what the last cell asks for: 'print(X)' -> 'X'; 'raise' -> an error."""

    backend = "scripted"

    def __init__(self):
        self.calls = []

    def execute(self, cells):
        self.calls.append(list(cells))
        code = cells[-1]
        if "raise" in code:
            return ExecResult(stdout="", error="ValueError: boom")
        if code.startswith("print(") and code.endswith(")"):
            return ExecResult(stdout=code[6:-1] + "\n")
        return ExecResult(stdout="")


def exact(a, b) -> bool:
    return a is not None and b is not None and a.strip() == b.strip()
