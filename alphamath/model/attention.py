"""An attention kernel for grouped-query attention that never repeats K/V, registered with transformers.

It exists because transformers' SDPA path copies every cached key and value once per query group
whenever a mask is passed, which dominated the decode steps of LocalLM's padded batches; models
load with `attn_implementation=GROUPED_SDPA` (see value_head.py).
"""
from __future__ import annotations

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
