"""Which torch dtype the model computes in: an explicit choice, ALPHAMATH_DTYPE, or what the hardware does fast.

It exists because loading (value_head.py) and training (trainer_svc.train) must pick the same
compute dtype, and bf16 is only worth it where the CPU multiplies it natively.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _parse_dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    key = value.strip().lower().replace("bfloat16", "bf16").replace("float32", "fp32").replace("float16", "fp16")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {value!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (read once) or the text given; empty where unreadable."""
    return _proc_cpu_flags() if cpuinfo is None else _parse_flags(cpuinfo)


@functools.cache
def _proc_cpu_flags() -> frozenset[str]:
    try:
        return _parse_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return frozenset()


def _parse_flags(cpuinfo: str) -> frozenset[str]:
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return frozenset(flags)


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """True if the CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16); otherwise bf16 is emulated and slow."""
    return bool(cpu_flags(cpuinfo) & {"avx512_bf16", "amx_bf16"})


def cpu_has_amx(cpuinfo: str | None = None) -> bool:
    """True if the CPU has AMX bf16 tiles (oneDNN uses them for bf16 matmuls)."""
    return "amx_bf16" in cpu_flags(cpuinfo)


def default_dtype(dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.dtype:
    """Explicit argument > env ALPHAMATH_DTYPE > bf16 on CUDA or bf16-capable CPUs > fp32."""
    if dtype is not None:
        return _parse_dtype(dtype)
    if os.environ.get("ALPHAMATH_DTYPE"):
        return _parse_dtype(os.environ["ALPHAMATH_DTYPE"])
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
