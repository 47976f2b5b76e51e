"""A linear layer for CPU inference whose bf16 weight is pre-packed in oneDNN's blocked layout.

It exists because torch's bf16 `F.linear` on CPU re-lays the weight out for oneDNN on every call:
a decode step of the embedded model (210 small matmuls and the LM head) spent 33 of its 44 ms in
matmuls, ~8 GB/s against the machine's ~37 GB/s. Packing once (what inductor's weight freezing
does) gives bit-identical outputs in about half the time per matmul. Elsewhere (fp32, GPUs, CPUs
without native bf16) it is a plain `F.linear`.
"""
from __future__ import annotations

import torch


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """bf16 on a CPU whose oneDNN has native bf16 kernels (AVX512-BF16 / AMX)."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Linear:
    """y = x W^T + b for inference, from a weight [out, in] it copies (packed where `can_pack`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        weight = weight.detach()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.bias = None if bias is None else bias.detach()
        self.packed = can_pack(weight.dtype, weight.device)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight, self.bias,
                                                 "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)
