"""The policy/value network: a causal LM whose trunk also feeds a value head (trl-style).

AlphaMath shares one transformer between the policy (next-token logits) and the value model
(Linear(hidden, 1) + tanh on the last hidden state at a step end), so one forward pass yields
both. `ValueHeadModel` wraps any HF `AutoModelForCausalLM`; the head is stored beside the HF
checkpoint as `value_head.safetensors`, so the checkpoint stays loadable by plain HF tools/TGI.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from alphamath.model.attention import GROUPED_SDPA, register_attention
from alphamath.model.dtype import default_dtype

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class ValueHeadOutput:
    logits: torch.Tensor  # [B, T, vocab] next-token logits (only the kept positions, see forward)
    values: torch.Tensor  # [B, T] tanh(value_head(h)) in [-1, 1], float32
    past_key_values: object | None = None


class ValueHeadModel(nn.Module):
    """A causal LM plus a scalar value head on the trunk's last hidden state (shared trunk, one pass)."""

    def __init__(self, lm: nn.Module, tokenizer=None, value_head: nn.Linear | None = None):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        hidden = lm.config.hidden_size
        if value_head is None:
            # Zero init: an untrained head says 0 ("as likely right as wrong") for every state, so it
            # adds no noise to PUCT before training; a single linear layer has no symmetry to break
            # and tanh'(0) = 1, so gradients flow fully from the first step.
            value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(value_head.weight)
            nn.init.zeros_(value_head.bias)
        self.value_head = value_head.to(device=self.device, dtype=self.dtype)

    @property
    def config(self):
        return self.lm.config

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.lm.parameters()).dtype

    @property
    def trunk(self) -> nn.Module:
        """The decoder without the LM head (HF's `base_model`), whose output is after the final norm."""
        return self.lm.base_model

    @property
    def lm_head(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def hidden(self, input_ids, attention_mask=None, past_key_values=None, position_ids=None, use_cache=False):
        """Run the trunk once; returns (last hidden states [B, T, H], cache)."""
        out = self.trunk(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
            use_cache=use_cache,
        )
        return out.last_hidden_state, (out.past_key_values if use_cache else None)

    def values_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """tanh(w·h + b) in float32, also under bf16 autocast: in bf16, tanh rounds to exactly -1 once
        w·h + b < -3.8, so a head that leans "wrong" reads a loss and a gradient of exactly 0 on every
        wrong path (session 13's joint steps: value loss 0.0000 on wrong-only batches)."""
        w, b = self.value_head.weight.float(), self.value_head.bias.float()
        with torch.autocast(h.device.type, enabled=False):
            return torch.tanh(F.linear(h.float(), w, b)).squeeze(-1)

    def forward(self, input_ids, attention_mask=None, past_key_values=None, position_ids=None,
                use_cache=False, logits_positions: torch.Tensor | None = None) -> ValueHeadOutput:
        """Logits and values per position from a single trunk pass.

        `logits_positions` ([B] indices) restricts the LM head to one position per row, which is all
        generation needs and saves a [B, T, vocab] tensor on long prefills.
        """
        h, cache = self.hidden(input_ids, attention_mask, past_key_values, position_ids, use_cache)
        values = self.values_from_hidden(h)
        if logits_positions is not None:
            rows = torch.arange(h.shape[0], device=h.device)
            h = h[rows, logits_positions].unsqueeze(1)
        return ValueHeadOutput(logits=self.lm_head(h), values=values, past_key_values=cache)

    # ---- checkpoints -------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, tokenizer=None) -> Path:
        """HF checkpoint (safetensors) + tokenizer + value_head.safetensors in `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(directory, safe_serialization=True)
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        head = {k: v.detach().contiguous().cpu() for k, v in self.value_head.state_dict().items()}
        save_file(head, str(directory / VALUE_HEAD_FILE))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, dtype: str | torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> "ValueHeadModel":
        """Load any HF causal-LM checkpoint dir; one without value_head.safetensors gets a fresh (zero) head."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory = Path(directory)
        has_weights = any(directory.glob("*.safetensors")) or any(directory.glob("*.bin"))
        if not (directory / "config.json").is_file() or not has_weights:
            raise FileNotFoundError(f"model dir {directory} has no config.json/weights")
        with _LOAD_LOCK:  # transformers builds modules on the meta device process-wide while loading:
            # a module made meanwhile in another thread (a concurrent reload) would get no data
            torch_dtype = default_dtype(dtype, device)
            register_attention()
            lm = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype,
                                                      attn_implementation=GROUPED_SDPA).to(device)
            lm.eval()
            tokenizer = None
            if (directory / "tokenizer_config.json").is_file() or (directory / "tokenizer.json").is_file():
                tokenizer = AutoTokenizer.from_pretrained(directory)
            head = None
            head_path = directory / VALUE_HEAD_FILE
            if head_path.is_file():
                state = load_file(str(head_path))
                head = nn.Linear(lm.config.hidden_size, 1)
                try:
                    head.load_state_dict(state)
                except RuntimeError as e:
                    raise ValueError(f"{head_path} does not fit hidden size {lm.config.hidden_size}: {e}") from e
            model = cls(lm, tokenizer, head)
            model.eval()
            return model


_LOAD_LOCK = threading.Lock()
