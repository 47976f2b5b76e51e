"""One memory budget for the engine: the prefix cache, the running decode batch and the prefill's
activations share `ALPHAMATH_MEMORY_MB`, so that no concurrency and no search method can grow the
process past it (issue 14: SBS at concurrency 8 once reached 22.5 GB and stalled the machine).

What the budget holds, and what happens to work beyond it:
  prefix cache     `cache_share` of it, in tokens of KV      -> least recently used prefixes are evicted
  decode batch     `batch_share`; joining a running batch    -> a request waits at a step boundary
                   copies its KV once, so the batch's own       until the batch has room
                   limit is half of its share
  prefill          `prefill_share`, estimated per forward     -> the prompts are prefilled in more,
                   (KV copies, attention scores, MLP)            smaller forwards
The model's weights and the interpreter are outside it (about 1 GB for SmolLM2-135M in bf16): the
process's peak is the budget plus that. Servers bound what may wait (admission gates, the batcher's
queue); a request beyond those is refused with RESOURCE_EXHAUSTED.

The allocator: glibc hands freed tensor memory back to the OS only for mmap-ed blocks, and its
mmap threshold rises after each free of a large block, until most tensors come from heap arenas
that fragment and never shrink. `configure_allocator` fixes the threshold (and the number of
arenas), so memory freed by the cache, the batch and a prefill is returned at once.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

DEFAULT_MEMORY_MB = 4096
ENV = "ALPHAMATH_MEMORY_MB"

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 1 << 20   # blocks of 1 MB and more are mmap-ed, and unmapped when freed
TRIM_THRESHOLD = 64 << 20  # the heap's top is given back beyond 64 MB free
ARENA_MAX = 2


@dataclass(frozen=True)
class MemoryBudget:
    total_bytes: int
    cache_share: float = 0.25
    batch_share: float = 0.40
    prefill_share: float = 0.35

    @classmethod
    def from_env(cls) -> "MemoryBudget":
        raw = os.environ.get(ENV, "")
        try:
            mb = int(raw) if raw else DEFAULT_MEMORY_MB
        except ValueError:
            raise ValueError(f"{ENV} must be a whole number of MB, got {raw!r}") from None
        if mb < 256:
            raise ValueError(f"{ENV}={mb}: the engine needs at least 256 MB")
        return cls(mb << 20)

    def cached_tokens(self, kv_bytes_per_token: int) -> int:
        return max(1, int(self.total_bytes * self.cache_share) // kv_bytes_per_token)

    @property
    def batch_kv_bytes(self) -> int:
        """The running batch's KV limit: half its share, since joining the batch copies it once."""
        return int(self.total_bytes * self.batch_share) // 2

    @property
    def prefill_bytes(self) -> int:
        return int(self.total_bytes * self.prefill_share)


def prefill_bytes(rows: int, past: int, new: int, kv_bytes_per_token: int, heads: int, hidden: int,
                  intermediate: int) -> int:
    """Upper estimate of one prefill forward's transient memory for `rows` rows padded to `past`
    cached + `new` tokens: the past KV copied into the forward's cache and concatenated with the new
    tokens' (2x), one layer's attention scores and probabilities in fp32, and one layer's
    hidden/MLP activations in fp32 (layers run one after another, so one layer's worth is live)."""
    width = past + new
    cache = 2 * rows * width * kv_bytes_per_token
    attention = 2 * rows * heads * new * width * 4
    mlp = rows * new * (3 * intermediate + 4 * hidden) * 4
    return cache + attention + mlp


_configured = False


def configure_allocator() -> bool:
    """Set glibc's malloc so that freed tensors go back to the OS (see the module doc). Idempotent;
    False where the C library is not glibc (nothing to set)."""
    global _configured
    if _configured:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = all(mallopt(param, value) == 1 for param, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                              (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                                              (_M_ARENA_MAX, ARENA_MAX)))
    _configured = ok
    return ok
