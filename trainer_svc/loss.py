"""AlphaMath's joint objective: policy SFT on correct paths + value regression on all paths.

    L = CE(policy tokens of correct paths) + alpha * mean_i (V(s_i) - target(s_i))^2

The value head is read at the last token of each state s_i = prompt + steps[0..i] (the same token
`LocalLM.score(render_state(...))` reads at inference), and regressed onto the step's mean
outcome (examples.py).
The LM loss covers only what the policy writes: the prompt is excluded, and so is what the engine
appends after a code cell (the <output> block and the closing </step>), which the model never
generates and must not learn to hallucinate.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from alphamath.steps import CODE_CLOSE, OUTPUT_OPEN, STEP_OPEN

IGNORE = -100


class JointLoss(NamedTuple):
    loss: torch.Tensor        # lm + alpha * value: what to backpropagate
    lm_loss: torch.Tensor     # mean token cross-entropy over labelled tokens (0 if none)
    value_loss: torch.Tensor  # mean squared error over step ends (0 if none)


def lm_positions(batch: dict) -> torch.Tensor:
    """[B, T - 1] bool: the positions t whose logits predict a labelled token t + 1 (row-major order is
    the order of joint_loss's `lm_logits`)."""
    return batch["labels"][:, 1:] != IGNORE


MIN_SHARED = 32  # shorter common prefixes are not worth a second forward


def shared_prefix(batch: dict) -> int:
    """Tokens at the start that every row of a right-padded batch has in common, leaving each row
    at least one token of its own (0 for a single row)."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    if ids.shape[0] < 2:
        return 0
    same = ((ids == ids[:1]) & mask).all(0)
    return min(int(same.long().cumprod(0).sum()), int(mask.sum(1).min()) - 1)


def trunk_pass(model, batch: dict, share: bool = True) -> torch.Tensor:
    """Last hidden states [B, T, H] of the batch. Rows that begin alike (every prompt starts with the
    same instructions and worked examples: ~310 of a path's ~465 tokens) compute that prefix once,
    as one row whose keys and values every row attends to; autograd sums the rows' gradients into
    it, so the loss and its gradient are the full pass's, for ~40% fewer tokens."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n = shared_prefix(batch) if share else 0
    if n < MIN_SHARED:
        return model.hidden(ids, attention_mask=mask)[0]
    from transformers import DynamicCache

    B, T = ids.shape
    h_prefix, prefix_kv = model.hidden(ids[:1, :n], attention_mask=mask[:1, :n], use_cache=True)
    cache = DynamicCache()
    for layer, (k, v) in enumerate((lay.keys, lay.values) for lay in prefix_kv.layers):
        cache.update(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), layer)
    pos = torch.arange(n, T, device=ids.device).expand(B, -1)
    h_rest, _ = model.hidden(ids[:, n:], attention_mask=mask, past_key_values=cache, position_ids=pos,
                             use_cache=True)
    return torch.cat([h_prefix.expand(B, -1, -1), h_rest], 1)


def policy_value_pass(model, batch: dict, share: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One trunk pass of a ValueHeadModel (trunk_pass): (logits at lm_positions [N, vocab], values [B, T]).

    The LM head runs only where a token is labelled: wrong paths, prompts and engine-written outputs
    carry no LM loss, and [B, T, vocab] logits (49k wide for SmolLM2) were a fifth of the forward's
    FLOPs and its largest tensor (fp32 logits of 4 x 600 tokens: 470 MB, and as much again for
    their gradient)."""
    h = trunk_pass(model, batch, share)
    values = model.values_from_hidden(h)
    return model.lm_head(h[:, :-1][lm_positions(batch).to(h.device)]), values


def joint_loss(lm_logits: torch.Tensor, values: torch.Tensor, batch: dict, alpha: float = 0.1) -> JointLoss:
    """lm_logits [N, V] at lm_positions(batch) (policy_value_pass) and values [B, T], from one
    ValueHeadModel pass over batch["input_ids"].

    batch["labels"] [B, T] holds token ids where the LM is trained (IGNORE elsewhere), aligned with
    input_ids (logits at t predict labels at t+1); batch["value_targets"] / ["value_mask"] [B, T]
    hold Q targets at step-end positions. A batch of only wrong paths has lm_loss 0, not NaN.
    """
    labels = batch["labels"].to(lm_logits.device)
    targets_lm = labels[:, 1:][lm_positions(batch).to(lm_logits.device)]
    if lm_logits.shape[0] != targets_lm.shape[0]:
        raise ValueError(f"{lm_logits.shape[0]} logits rows for {targets_lm.shape[0]} labelled tokens")
    if targets_lm.numel():
        lm = F.cross_entropy(lm_logits.float(), targets_lm)
    else:
        lm = lm_logits.sum() * 0.0  # keeps the graph (and DDP) happy without contributing
    mask = batch["value_mask"].to(values.device, torch.float32)
    targets = batch["value_targets"].to(values.device, torch.float32)
    sq = (values.float() - targets) ** 2 * mask
    value = sq.sum() / mask.sum().clamp(min=1.0)
    return JointLoss(lm + alpha * value, lm, value)


def _field(example: Any, *names: str):
    for name in names:
        if isinstance(example, dict) and name in example:
            return example[name]
        if hasattr(example, name):
            return getattr(example, name)
    raise KeyError(f"example has none of the fields {names}")


def _spans(prompt: str, steps: Sequence[str]) -> tuple[list[int], list[tuple[int, int]]]:
    """Character ends of each state and the spans the engine (not the policy) wrote."""
    ends, engine, pos = [], [], len(prompt)
    for i, step in enumerate(steps):
        start = pos + (len(STEP_OPEN) if i else 0)
        pos = start + len(step)
        ends.append(pos)
        cut = step.rfind(CODE_CLOSE)
        if cut >= 0 and OUTPUT_OPEN in step[cut:]:
            engine.append((start + cut + len(CODE_CLOSE), pos))
    return ends, engine


def collate(examples: Sequence[Any], tokenizer, max_len: int,
            value_weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels, value_targets, value_mask.

    `value_mask` holds each example's value weight (default 1) at its step ends: joint_loss's value
    term is the weighted mean of the squared errors.

    Examples are dicts {"prompt", "steps", "q_values", "correct"} (or objects such as
    trainer_svc.examples.Example with `values`). The full text is tokenized once, as inference
    tokenizes a state; each state's value position is the last token ending at or before the
    state's last character. Sequences are cut at max_len tokens (what falls beyond is dropped).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    weights = [1.0] * len(examples) if value_weights is None else [float(w) for w in value_weights]
    if len(weights) != len(examples):
        raise ValueError(f"{len(weights)} value weights for {len(examples)} examples")
    for ex, weight in zip(examples, weights):
        prompt, steps = _field(ex, "prompt"), list(_field(ex, "steps"))
        q = [float(v) for v in _field(ex, "q_values", "values")]
        correct = bool(_field(ex, "correct"))
        if not steps or len(steps) != len(q):
            raise ValueError(f"need one Q value per step, got {len(steps)} steps and {len(q)} values")
        text = prompt + STEP_OPEN.join(steps)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"][:max_len], enc["offset_mapping"][:max_len]
        ends, engine = _spans(prompt, steps)
        labels = [IGNORE] * len(ids)
        if correct:
            for t, (a, _) in enumerate(offsets):
                if a >= len(prompt) and not any(s <= a < e for s, e in engine):
                    labels[t] = ids[t]
        vt, vm = [0.0] * len(ids), [0.0] * len(ids)
        for end, target in zip(ends, q):
            last = max((t for t, (_, b) in enumerate(offsets) if b <= end), default=None)
            if last is not None and offsets[last][1] > len(prompt) and enc["offset_mapping"][len(ids) - 1][1] >= end:
                vt[last], vm[last] = target, weight
        rows.append((ids, labels, vt, vm))
    T = max(len(r[0]) for r in rows)
    out = {
        "input_ids": torch.full((len(rows), T), pad, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), T, dtype=torch.long),
        "labels": torch.full((len(rows), T), IGNORE, dtype=torch.long),
        "value_targets": torch.zeros(len(rows), T),
        "value_mask": torch.zeros(len(rows), T),
    }
    for i, (ids, labels, vt, vm) in enumerate(rows):
        n = len(ids)
        out["input_ids"][i, :n] = torch.tensor(ids, dtype=torch.long)
        out["attention_mask"][i, :n] = 1
        out["labels"][i, :n] = torch.tensor(labels, dtype=torch.long)
        out["value_targets"][i, :n] = torch.tensor(vt)
        out["value_mask"][i, :n] = torch.tensor(vm)
    return out
