"""Attention kernels: grouped-query attention that never repeats K/V (registered with transformers),
and a decode step's attention over prompts shared by many rows (used by fast_llama.py).

The first exists because transformers' SDPA path copies every cached key and value once per query group
whenever a mask is passed, which dominated the decode steps of LocalLM's padded batches; models
load with `attn_implementation=GROUPED_SDPA` (see value_head.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GROUPED_SDPA = "alphamath_grouped_sdpa"


def grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Masked scaled-dot-product attention for grouped-query attention, without repeating K/V.

    transformers' SDPA path copies every cached key and value `groups` times per layer whenever a mask
    is passed (left-padded batches of many prompts): for 48 rows of SmolLM2 (9 query / 3 KV heads)
    that copy dominated a decode step. Query heads h = g * groups + r share KV head g, so the queries
    are folded into each KV head's query axis instead: q [B, H, S, D] -> [B, H/groups, groups * S, D],
    the mask [B, 1, S, L] tiled to [B, 1, groups * S, L]; exact, and only queries move. An unpadded
    decode step (one query per row, no mask) is folded the same way: torch's CPU kernel with
    `enable_gqa` took ~6x longer for it in bf16 (B=5, 1.5k keys: 7.7 ms vs 1.1 ms per layer). Two plain
    matmuls were faster on contiguous tensors but slower in the decode loop, whose cached K/V are
    strided views of preallocated buffers (241 vs 166 ms per step for 40 padded rows).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    B, H, S, D = query.shape
    if groups == 1 or (attention_mask is None and S > 1):  # unmasked prefill: causal SDPA with enable_gqa
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    q = query.reshape(B, H // groups, groups * S, D)
    mask = None  # one query per row (an unpadded decode step) sees every cached key
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        if mask.shape[2] > 1:
            mask = mask.repeat(1, 1, groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.reshape(B, H, S, D).transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Make GROUPED_SDPA a name transformers accepts as `attn_implementation` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)


@dataclass
class SharedPrompts:
    """The KV of a decode batch's distinct prompts, held once for every row that continues one.

    The n samples of an MCTS expansion or an SBS beam continue one prompt: holding its KV once per
    row multiplied the batch's KV (and each step's reads of it) by n. Here each row holds only the
    tokens it has fed since its prompt, and attends to its prompt through these:
      keys, values  per layer [G, Hk, L, D]: prompt g in columns [0, len g), zeros after it (a slot
                    of the batch's prompt slab; a free slot has length 0 and no rows);
      mask          [G, 1, 1, L] additive, 0 on a prompt's tokens and -inf after, in the KV dtype;
      members       [G, R] the rows continuing each prompt, padded by repeating its first row (row 0
                    for a free slot: its outputs are never read back);
      slot          [B] where each row sits in members.flatten();
      one_each      every row continues its own prompt, in order (G = B, R = 1: batch-1 and greedy
                    decoding), so queries and outputs need no gathering;
      lengths, group  [G] each prompt's length and [B] each row's prompt (decode.cpp's view
                    of the same layout: it needs no mask and no gathering);
      tiles         per layer decode.prompt_tiles(keys, values), where decode attention runs on AMX
                    tiles, else None;
      root_tiles, root_len  where the C++ kernels compute attention (decode.cpp, avx2.cpp): per layer
                    the K/V of a prefix held once (the few-shot prompt every question opens with), as
                    the kernel reads them (decode.prompt_tiles in bf16; [Hk, Lr, D] as they are in
                    fp32), and [G] its length for each prompt, 0 where a slot holds its prompt whole. A
                    rooted prompt's slot, `lengths` and `mask` hold only what follows the root, so a
                    step reads the root's KV once, not once per prompt. None: no root.
    """

    keys: list
    values: list
    mask: torch.Tensor
    members: torch.Tensor
    slot: torch.Tensor
    one_each: bool = False
    lengths: torch.Tensor | None = None
    group: torch.Tensor | None = None
    tiles: list | None = None
    root_tiles: list | None = None
    root_len: torch.Tensor | None = None


_flash_with_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # -> (out, logsumexp)


def shared_prompt_attention(q, k, v, own_mask, prompts: SharedPrompts, layer: int, scale: float) -> torch.Tensor:
    """One decode step's attention over each row's prompt (shared) and own columns.

    q [B, Hk, g, D] (query heads folded onto their KV head, one new token per row); k/v [B, Hk, W, D]
    each row's own columns; own_mask [B, 1, 1, W] additive or None. Softmax over the union of both key
    sets, computed as two attentions merged by their log-sum-exps l1, l2 (as flash-decoding merges
    splits):  out = o_own + sigmoid(l1 - l2) * (o_prompt - o_own).
    The prompt pass stacks the queries of all rows of a prompt into one [R * g]-query attention, so
    each prompt's keys are read once per step however many rows continue it.
    """
    if prompts.root_len is not None:
        raise ValueError("shared_prompt_attention cannot read a root: only the C++ kernels hold one")
    B, Hk, g, D = q.shape
    G, R = prompts.members.shape
    if prompts.one_each:  # row b's queries are prompt b's: nothing to gather or scatter
        o1, l1 = _flash_with_lse(q, prompts.keys[layer], prompts.values[layer], attn_mask=prompts.mask, scale=scale)
    else:
        qg = q[prompts.members].permute(0, 2, 1, 3, 4).reshape(G, Hk, R * g, D)  # padding rows: repeats, not read back
        o1, l1 = _flash_with_lse(qg, prompts.keys[layer], prompts.values[layer], attn_mask=prompts.mask, scale=scale)
        o1 = o1.reshape(G, Hk, R, g, D).permute(0, 2, 1, 3, 4).reshape(G * R, Hk, g, D)[prompts.slot]
        l1 = l1.reshape(G, Hk, R, g).permute(0, 2, 1, 3).reshape(G * R, Hk, g)[prompts.slot]
    o2, l2 = _flash_with_lse(q, k, v, attn_mask=own_mask, scale=scale)
    w = torch.sigmoid(l1 - l2).unsqueeze(-1)
    return torch.lerp(o2.float(), o1.float(), w).to(q.dtype)
