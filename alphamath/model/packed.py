"""Linear layers whose weights are pre-packed in oneDNN's blocked layout, for CPU inference in bf16.

It exists because torch's bf16 `F.linear` on CPU re-lays the weight out for oneDNN on every call:
a decode step of the embedded model (210 small matmuls and the LM head) ran at ~11 GB/s against
the machine's ~37 GB/s, 44 ms where the weights alone take ~7 ms to read. Packing once (what
inductor's weight freezing does) gives bit-identical outputs in about half the time per matmul.
Only `LocalLM` packs, because it only runs inference: with gradients on (training) the layer
takes the plain path, and a weight changed in place since packing is packed again.
"""
from __future__ import annotations

import torch
from torch import nn


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """bf16 on a CPU whose oneDNN has native bf16 kernels (AVX512-BF16 / AMX)."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """nn.Linear with a packed copy of its weight; `weight`/`bias` stay the same Parameters (same
    state_dict keys, tied embeddings still tied), so checkpoints and HF code see a plain Linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self._pack()

    def _pack(self) -> None:
        with torch.no_grad():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)
        self._version = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != self.weight.dtype:
            return nn.functional.linear(x, self.weight, self.bias)
        if self.weight._version != self._version:
            self._pack()
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self._packed, self.bias,
                                                 "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


def pack_linears(module: nn.Module) -> int:
    """Replace every nn.Linear under `module` by a PackedLinear; returns how many were replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, PackedLinear(child))
            count += 1
        else:
            count += pack_linears(child)
    return count
