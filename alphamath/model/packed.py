"""A linear layer for CPU inference whose weight is laid out once for the matmuls it will serve.

It exists because a decode step of the embedded model reads every weight to compute a few rows, so
its speed is the speed of reading weights:
- torch's bf16 `F.linear` on CPU re-lays the weight out for oneDNN on every call (a decode step spent
  33 of its 44 ms in matmuls, ~8 GB/s against the machine's ~37 GB/s). Packing once (what inductor's
  weight freezing does) gives bit-identical outputs in about half the time per matmul.
- CPUs without native bf16 compute in fp32, so a step reads 4 bytes per weight (2.9x the bandwidth
  floor on an AVX2-only EPYC). There, calls of a few rows read an int8 copy instead (symmetric,
  per output channel; `torch.ops.aten._weight_int8pack_mm` with bf16 activations, as gpt-fast does):
  2.5-3x faster at 1-5 rows, slower from ~40 rows on (`python -m tests.bench_weights`), so prefills
  and wide batches keep the float weight and its exact numbers.
Elsewhere (GPUs, ALPHAMATH_DECODE_WEIGHTS=float) it is a plain `F.linear`.
"""
from __future__ import annotations

import os

import torch

DECODE_WEIGHTS = ("int8", "float")
INT8_BELOW_ROWS = 16  # calls of fewer rows read int8 weights (1.4x faster at 15 rows, even at ~24 on the AVX2 EPYC)


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """bf16 on a CPU whose oneDNN has native bf16 kernels (AVX512-BF16 / AMX)."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def int8_below_rows(dtype: torch.dtype, device: torch.device, decode_weights: str | None = None) -> int:
    """Rows below which a call reads int8 weights: INT8_BELOW_ROWS for fp32 on CPU, 0 (never) otherwise.
    `decode_weights` (default ALPHAMATH_DECODE_WEIGHTS, else "int8") set to "float" keeps every call exact."""
    choice = (decode_weights or os.environ.get("ALPHAMATH_DECODE_WEIGHTS") or "int8").strip().lower()
    if choice not in DECODE_WEIGHTS:
        raise ValueError(f"decode weights {choice!r}: expected one of {DECODE_WEIGHTS}")
    return INT8_BELOW_ROWS if choice == "int8" and device.type == "cpu" and dtype == torch.float32 else 0


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight ~= q * scale[:, None], |error| <= scale / 2 per entry."""
    w = weight.detach().float()
    scale = w.abs().amax(1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).to(torch.int8).contiguous(), scale


class Linear:
    """y = x W^T + b for inference, from a weight [out, in] it copies (packed where `can_pack`; with an
    int8 copy read by calls of fewer than `int8_below` rows)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, int8_below: int = 0):
        weight = weight.detach()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.bias = None if bias is None else bias.detach()
        self.packed = can_pack(weight.dtype, weight.device)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if self.packed else weight
        self.int8_below = int8_below
        if int8_below:
            self.q, scale = quantize_int8(weight)
            self.scale = scale.to(torch.bfloat16)  # the kernel takes scales in the activations' dtype

    def bytes_read(self, rows: int) -> int:
        """Bytes of weight (and bias) a call of `rows` rows reads: the floor of its time is these over bandwidth."""
        w = self.q.numel() + self.scale.numel() * 2 if rows < self.int8_below else self.weight.numel() * self.weight.element_size()
        return w + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_below and x.numel() < self.int8_below * self.in_features:
            out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                                     self.q, self.scale).to(x.dtype)
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*x.shape[:-1], self.out_features)
        if not self.packed:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight, self.bias,
                                                 "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)
