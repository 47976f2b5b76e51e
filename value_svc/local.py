"""In-process value models: `LocalValue` on the shared `LocalLM`, and `NaiveValue`, the no-cache baseline."""
from __future__ import annotations

import threading
from typing import Sequence

import torch

from alphamath.interfaces import Usage
from policy_svc.local import _unwrap


class LocalValue:
    """The Value protocol on a `LocalLM`: siblings share their parent's cached prefix."""

    def __init__(self, lm):
        self.lm = lm

    @property
    def usage(self) -> Usage:
        return self.lm.usage

    def score(self, states: Sequence[str]) -> list[float]:
        return self.lm.score(states)


class NaiveValue:
    """Baseline: one full forward per state, every token recomputed. Counts the tokens it computes."""

    def __init__(self, model, tokenizer=None):
        self.model, self.tokenizer = _unwrap(model, tokenizer)
        self.usage = Usage()
        self.lock = threading.Lock()

    @torch.inference_mode()
    def score(self, states: Sequence[str]) -> list[float]:
        out = []
        with self.lock:
            self.usage.calls["score"] = self.usage.calls.get("score", 0) + 1
            for s in states:
                ids = self.tokenizer(s, add_special_tokens=False)["input_ids"]
                if not ids:
                    raise ValueError("cannot score an empty state")
                h, _ = self.model.hidden(torch.tensor([ids], device=self.model.device))
                out.append(float(self.model.values_from_hidden(h[:, -1])[0]))
                self.usage.prefill_tokens += len(ids)
        return out
