"""Shared fixtures: a tiny randomly initialised Llama with the real SmolLM2 tokenizer."""
from __future__ import annotations

import os

import pytest
import torch

# The suite checks that caching, batching and scoring give transformers' own numbers, so its models read
# float weights in every matmul. The fp16 decode weights (alphamath/model/packed.py, the default where a
# CPU computes fp32) have their own tests, which ask for them explicitly.
os.environ.setdefault("ALPHAMATH_DECODE_WEIGHTS", "float")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The SmolLM2 tokenizer (chat template included): from the materialised cache dir, else the GGUF."""
    from alphamath.model import embedded_tokenizer

    return embedded_tokenizer()


def save_random_llama(path, tokenizer, **shape):
    """A Llama with random weights (init 0.5: a wider init than HF's 0.02, so the random model's
    distributions are not flat, no argmax ties) and the SmolLM2 tokenizer, saved as a HF checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=0.5, **shape)
    LlamaForCausalLM(config).to(torch.float32).eval().save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A 2-layer Llama (hidden 32, GQA 4q/2kv heads) with random weights, saved as a HF checkpoint + tokenizer.

    No value head file: loading it gives a fresh head. Tests that need a head copy the dir.
    """
    return save_random_llama(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer, hidden_size=32,
                             intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def pytest_configure(config):
    config.addinivalue_line("markers", "faults: kill-and-restart tests of the whole stack (make test-faults)")
