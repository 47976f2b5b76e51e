"""A decode step's kernels for CPUs that compute fp32 (AVX2, FMA and F16C; no native bf16): the matmuls
on fp16 weights, RMSNorm, RoPE, attention over shared prompts, and a decoder layer in two calls.

Why: on such CPUs (an AVX2-only EPYC, Zen 2) the model computes fp32 and a decode step ran torch ops:
fbgemm's fp16 matmuls (packed.py), then per layer ~25 small operations, each a dispatch and, at a few
rows, more overhead than arithmetic. A batch-1 step took 31.8 ms against an 11.9 ms weight-read floor
(2.7x), with llama.cpp 2.7x faster; the matmuls were ~15 ms of it, RMSNorm ~3 ms (61 calls of torch's
composite rms_norm), SDPA's flash kernel ~4 ms (two calls per layer for one query row; 21 ms of a
20-row step over 4 prompts). These kernels run a decode step's layer in two C++ calls around the
cache update, as decode.cpp does for bf16 on CPUs with AVX512-BF16.

`linear_f16` multiplies fp32 rows by fp16 weights laid out once in panels of 16 outputs (pack_f16),
with fp32 sums, the same numbers fbgemm's fp16 GEMM computes up to the order of the sums (both
within 2e-6 of the exact products of the fp16 weights). The trunk's 120 matmuls and the 49k-wide head
on the Zen 2, against fbgemm (2 threads, best of 3): 1 row 9.2 vs 11.7 ms and 2.1 vs 2.2; 5 rows 10.5 vs
15.6 and 2.4 vs 2.9; 20 rows 33.2 vs 36.5 and 8.3 vs 10.9; 48 rows 71.7 vs 74.1 and 18.6 vs 22.8; 128
and 255 rows 0.97-0.98x on the trunk, 1.1-1.2x on the head. It replaces fbgemm's copy of the weights
where it runs, so the process holds one fp16 copy, not two.

Attention: for each (prompt, KV head), every query of the rows continuing that prompt scores the
prompt's keys 8 at a time (one horizontal reduction per 8 keys), then its own columns; one softmax
over both; P.V. It computes what attention.shared_prompt_attention computes, to fp32 rounding.

Built like decode.cpp (torch.utils.cpp_extension, cached under TORCH_EXTENSIONS_DIR, or prebuilt into
ALPHAMATH_KERNEL_DIR by the image); ALPHAMATH_DECODE_KERNEL=0 turns it off too (the torch path).
"""
from __future__ import annotations

from pathlib import Path

import torch

from alphamath.model import extension
from alphamath.model.dtype import cpu_flags

NAME = "alphamath_avx2"
SOURCE = Path(__file__).with_suffix(".cpp")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
NEEDS = {"avx2", "fma", "f16c"}
_EMPTY, _EMPTY_BOOL = torch.empty(0), torch.empty(0, dtype=torch.bool)


def cpu_ok(cpuinfo: str | None = None) -> bool:
    """Does the CPU run these kernels (AVX2, FMA and F16C)?"""
    return NEEDS <= cpu_flags(cpuinfo)


_kernel = extension.Kernel(NAME, SOURCE, FLAGS, lambda: None if cpu_ok() else "this CPU lacks AVX2, FMA or F16C",
                           "fp32 decode kernels")


kernel, build, failed = _kernel, _kernel.build, _kernel.reason  # the module (or None), compile, why None


def linear_usable(weight: torch.Tensor) -> bool:
    """Can `linear_f16` serve `weight` [N, K] here: float on the CPU, N a multiple of 16, the kernels built?"""
    return (weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.dim() == 2
            and weight.shape[0] % 16 == 0 and kernel() is not None)


def pack_f16(weight: torch.Tensor) -> torch.Tensor:
    """float [N, K] -> fp16 [N / 16, K, 16], the layout `linear_f16` reads (a copy)."""
    return kernel().pack_f16(weight.detach())


def linear_f16(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] fp32 -> x W^T + bias [..., N] fp32, W laid out by `pack_f16`."""
    return kernel().linear_f16(x, packed, _EMPTY if bias is None else bias)


def usable(x: torch.Tensor, head_dim: int) -> bool:
    """Can the layer kernels compute a decode step with activations like `x` (fp32 on the CPU) here?"""
    return x.dtype == torch.float32 and x.device.type == "cpu" and head_dim in (64, 128) and kernel() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm of fp32 rows in one pass (the sum of squares in fp64)."""
    return kernel().rms_norm(x, weight, float(eps))


def rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """qkv [B, S, H, D], cos/sin [B, S, D] fp32 -> x * cos + rotate_half(x) * sin of the first `heads` heads."""
    return kernel().rope(qkv, cos, sin, int(heads))


def decode_attention(q, own_k, own_v, own_valid, keys, values, prompt_len, group_of, scale: float,
                     own_of=None, root: tuple | None = None) -> torch.Tensor:
    """q [B, Hk, g, D]; own_k/own_v [R, Hk, W, D]; own_valid [B, W] bool or None; keys/values [G, Hk, L, D];
    prompt_len [G]; group_of [B]; own_of [B] the own row each query row continues (None: rows b * B/R ..
    continue own row b) -> [B, Hk, g, D], fp32. `root`: (keys [Hk, Lr, D], values, lengths [G]) of a prefix
    held once (kv.py's _Batch), which prompt g continues where lengths[g] > 0: its keys come before the slot's."""
    return kernel().decode_attention(q, own_k, own_v, _EMPTY_BOOL if own_valid is None else own_valid, keys, values,
                                     prompt_len, group_of, _EMPTY if own_of is None else own_of, float(scale),
                                     *_root_args(root))


def _root_args(root: tuple | None) -> tuple:
    """The kernels' root arguments: a root's K/V and per-prompt lengths, or empties (no root)."""
    return root if root is not None else (_EMPTY, _EMPTY, _EMPTY)


def decode_qkv(x, norm, qkv, qkv_bias, cos, sin, hq: int, hk: int, eps: float):
    """A decode step's layer, first half: x [B, 1, H] -> q [B, hq, 1, D], k, v [B, hk, 1, D] of
    rope(qkv(rms_norm(x))), `qkv` laid out by `pack_f16`."""
    return kernel().decode_qkv(x, norm, qkv, _EMPTY if qkv_bias is None else qkv_bias, cos, sin, int(hq), int(hk),
                               float(eps))


def decode_rest(x, q, k, v, own_valid, prompts_k, prompts_v, lengths, group, scale: float,
                o, o_bias, norm, gate_up, gate_up_bias, down, down_bias, eps: float, own_of=None,
                root: tuple | None = None):
    """A decode step's layer, second half: x + o(attention over the root, the prompts and own columns k/v),
    then + down(silu(gate) * up) with gate|up = gate_up(rms_norm(x)); weights laid out by `pack_f16`."""
    return kernel().decode_rest(
        x, q, k, v, _EMPTY_BOOL if own_valid is None else own_valid, prompts_k, prompts_v, lengths, group,
        _EMPTY if own_of is None else own_of, float(scale), o, _EMPTY if o_bias is None else o_bias, norm, gate_up,
        _EMPTY if gate_up_bias is None else gate_up_bias, down, _EMPTY if down_bias is None else down_bias, float(eps),
        *_root_args(root))


def decode_layers(x, cos, sin, own_valid, weights, buffers, n: int, T: int, prompts, group, scale: float, hq: int,
                  hk: int, eps: float, final_norm, own_of=None, col=None):
    """Every decoder layer of a decode step and the final norm in one call: per layer decode_qkv, the rows'
    T new K/V columns written at column n of `buffers` [(K, V) per layer, [B, hk, >= n + T, D]], then
    decode_rest over their columns [0, n + T). x [Q, 1, H] (Q = B * T; ragged: query row r is own row
    own_of[r]'s column n + col[r], int64 [Q], decode_layers.h); `weights` fast_llama.layer_weights(layers,
    "f16"); `prompts` the step's SharedPrompts (with its root, if it holds one: root_tiles, its K/V as they
    are in fp32, and root_len), `group` [Q] each query row's prompt. The same numbers as the two calls per layer."""
    rooted = prompts.root_len is not None
    return kernel().decode_layers(x, cos, sin, _EMPTY_BOOL if own_valid is None else own_valid, weights,
                                  [k for k, _ in buffers], [v for _, v in buffers], int(n), int(T), prompts.keys,
                                  prompts.values, prompts.lengths, group, _EMPTY if own_of is None else own_of,
                                  _EMPTY if col is None else col,
                                  [k for k, _ in prompts.root_tiles] if rooted else [],
                                  [v for _, v in prompts.root_tiles] if rooted else [],
                                  prompts.root_len if rooted else _EMPTY, float(scale), int(hq), int(hk), float(eps),
                                  final_norm)


def sample(logits: torch.Tensor, u: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] fp32 or bf16 (read as they are: bf16 converts to fp32 exactly), u [B] uniforms ->
    (tokens [B], log-probs [B]) of softmax(logits / T) by inverse CDF: the first token whose cumulative
    probability exceeds u. The engine's sampler on every CPU with AVX2, bf16 ones included."""
    return tuple(kernel().sample(logits, u, float(temperature)))
