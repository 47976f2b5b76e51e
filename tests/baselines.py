"""The no-cache baselines the engine is measured against (tests and `make bench` only):
`NaivePolicy` re-encodes the whole prompt for every sample, `NaiveValue` runs one full forward per state."""
from __future__ import annotations

import threading
from typing import Sequence

import torch

from alphamath import steps
from alphamath.interfaces import Sample, Usage


def unwrap(model, tokenizer):
    """Accept a ValueHeadModel (+ tokenizer) or anything holding one as `.model` (a LocalLM)."""
    if hasattr(model, "model") and hasattr(model, "tokenizer") and not hasattr(model, "value_head"):
        return model.model, tokenizer or model.tokenizer
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("a tokenizer is needed (none was saved with the model)")
    return model, tokenizer


class NaivePolicy:
    """The baseline LocalPolicy is measured against: each sample is its own `model.generate` call
    that re-encodes the whole prompt; nothing is cached or batched. Counts the tokens it computes."""

    def __init__(self, model, tokenizer=None):
        self.model, self.tokenizer = unwrap(model, tokenizer)
        self.usage = Usage()
        self.lock = threading.Lock()
        lm = self.model.lm
        eos = lm.generation_config.eos_token_id if lm.generation_config.eos_token_id is not None else lm.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}

    def render_prompt(self, question: str) -> str:
        return steps.render_prompt(question, self.tokenizer)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], n: int, *, stop: Sequence[str], temperature: float,
                 top_p: float = 1.0, max_new_tokens: int = 256, seed: int | None = None) -> list[list[Sample]]:
        stop = [s for s in stop if s]
        with self.lock:
            self.usage.calls["generate"] = self.usage.calls.get("generate", 0) + 1
            return [[self._one(p, k, stop, temperature, top_p, max_new_tokens, seed) for k in range(n)]
                    for p in prompts]

    def _one(self, prompt, k, stop, temperature, top_p, max_new_tokens, seed) -> Sample:
        ids = torch.tensor([self.tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=self.model.device)
        kwargs = dict(do_sample=False) if temperature == 0 else dict(do_sample=True, temperature=temperature, top_p=top_p)
        if temperature > 0 and seed is not None:
            torch.manual_seed(seed + k)
        out = self.model.lm.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, top_k=0,
            stop_strings=stop or None, tokenizer=self.tokenizer, pad_token_id=min(self.eos_ids),
            eos_token_id=sorted(self.eos_ids), output_scores=True, return_dict_in_generate=True, **kwargs)
        new = out.sequences[0, ids.shape[1]:].tolist()
        # scores are the processed logits the token was drawn from (temperature, top-p), as LocalLM reports
        logprob = sum(float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.scores, new))
        self.usage.prefill_tokens += ids.shape[1]
        self.usage.decode_tokens += len(new) - 1  # every generated token but the last is fed back
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        hits = [(i, s) for s in stop if (i := text.find(s)) >= 0]
        if new and new[-1] in self.eos_ids:
            finish = "eos"
        elif hits:
            i, s = min(hits)
            text, finish = text[: i + len(s)], "stop"
        else:
            finish = "length"
        return Sample(text, len(new), logprob, finish)


class NaiveValue:
    """Baseline: one full forward per state, every token recomputed. Counts the tokens it computes."""

    def __init__(self, model, tokenizer=None):
        self.model, self.tokenizer = unwrap(model, tokenizer)
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
