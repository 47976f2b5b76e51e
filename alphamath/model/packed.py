"""A linear layer for CPU inference whose weight is laid out once for the matmuls it will serve.

It exists because a decode step of the embedded model reads every weight to compute a few rows, so
its speed is the speed of reading weights:
- torch's bf16 `F.linear` on CPU re-lays the weight out for oneDNN on every call (a decode step spent
  33 of its 44 ms in matmuls, ~8 GB/s against the machine's ~37 GB/s). Packing once (what inductor's
  weight freezing does) gives bit-identical outputs in about half the time per matmul. Where the
  decode kernels run (AVX512-BF16), decode.cpp's `linear` reads the weight laid out in vdpbf16ps pairs
  instead: oneDNN still read at about half the memory's bandwidth for the few rows of a decode step
  (1.7x slower at 1 row, 1.2-1.4x at 4-20, 1.02-1.06x at 120-512; see decode.py). On CPUs with AMX,
  `linear` multiplies that layout in AMX tiles, which gives oneDNN's outputs at up to 1.6x its speed.
- CPUs without native bf16 compute in fp32, so a step read 4 bytes per weight (2.9x the bandwidth
  floor on an AVX2-only EPYC). There, calls of up to FP16_BELOW_ROWS rows (every decode step) read an
  fp16 copy through fbgemm's packed fp16 GEMM (`torch.ops.quantized.linear_dynamic_fp16`, fp32 in and
  out): 2.6x faster at 1 row, 3-4x at 2-15 rows, 1.1x at 120, with errors of ~2e-4 of the largest
  output. Weight-only int8 was 9% faster at 1 row but slower from 5 rows on, and 40x less exact
  (`python -m tests.bench_weights`). Prefills of more rows keep the fp32 weight and its exact numbers.
  Where avx2.py's kernels build (AVX2, FMA, F16C), its `linear_f16` reads the fp16 copy instead, laid
  out in panels, which lets a decode step's layer run as two C++ calls (avx2.decode_qkv / decode_rest);
  it computes fbgemm's numbers up to the order of the sums, and the process keeps one fp16 copy.
Elsewhere (GPUs, no fbgemm, ALPHAMATH_DECODE_WEIGHTS=float) it is a plain `F.linear`.
"""
from __future__ import annotations

import os

import torch

from alphamath.model import avx2
from alphamath.model import decode as kernels

DECODE_WEIGHTS = ("fp16", "float")
FP16_BELOW_ROWS = 256  # whole-model prefills were 1.2-2.1x faster at 64-255 rows; fbgemm's fp16 was 0.96x at 1000
FP16_MAX = 65504.0


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """bf16 on a CPU whose oneDNN has native bf16 kernels (AVX512-BF16 / AMX)."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def fp16_below_rows(dtype: torch.dtype, device: torch.device, decode_weights: str | None = None) -> int:
    """Rows below which a call reads fp16 weights: FP16_BELOW_ROWS for fp32 on a CPU with fbgemm, else 0.
    `decode_weights` (default ALPHAMATH_DECODE_WEIGHTS, else "fp16") set to "float" keeps every call exact."""
    choice = (decode_weights or os.environ.get("ALPHAMATH_DECODE_WEIGHTS") or "fp16").strip().lower()
    if choice not in DECODE_WEIGHTS:
        raise ValueError(f"decode weights {choice!r}: expected one of {DECODE_WEIGHTS}")
    usable = device.type == "cpu" and dtype == torch.float32 and "fbgemm" in torch.backends.quantized.supported_engines
    return FP16_BELOW_ROWS if choice == "fp16" and usable else 0


class Linear:
    """y = x W^T + b for inference, from a weight [out, in] it copies (laid out for decode.cpp's `linear`
    where that runs, else packed for oneDNN where `can_pack`; with an fp16 copy read by calls of fewer
    than `fp16_below` rows: avx2.py's panels `f16` where those kernels run, else fbgemm's)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, fp16_below: int = 0):
        weight = weight.detach()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.bias = None if bias is None else bias.detach()
        self.pairs = kernels.linear_usable(weight)
        self.packed = not self.pairs and can_pack(weight.dtype, weight.device)
        if self.pairs:
            self.weight = kernels.pack_linear(weight)
        else:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if self.packed else weight
        # A weight fp16 cannot hold keeps the float path (fbgemm would saturate it).
        self.fp16_below = fp16_below if fp16_below and float(weight.abs().max()) <= FP16_MAX else 0
        self.f16 = self.fp16 = None
        if self.fp16_below and avx2.linear_usable(weight):
            self.f16 = avx2.pack_f16(weight)
        elif self.fp16_below:
            self.fp16 = torch.ops.quantized.linear_prepack_fp16(weight.float(), self.bias)

    def bytes_read(self, rows: int) -> int:
        """Bytes of weight (and bias) a call of `rows` rows reads: the floor of its time is these over bandwidth."""
        per = 2 if rows < self.fp16_below else self.weight.element_size()
        return self.in_features * self.out_features * per + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`out`: where decode.cpp's linear computes, a bf16 buffer to write into (decode.linear); else unused."""
        if self.pairs:
            return kernels.linear(x, self.weight, self.bias, out)
        if self.fp16_below and x.numel() < self.fp16_below * self.in_features:
            if self.f16 is not None:
                return avx2.linear_f16(x, self.f16, self.bias)
            return torch.ops.quantized.linear_dynamic_fp16(x, self.fp16)
        if not self.packed:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight, self.bias,
                                                 "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)
