"""A decode step's hot spots as C++ kernels (decode.cpp), for CPUs with AVX512-BF16: the matmuls,
attention over shared prompts (bf16), RMSNorm and RoPE (tokens are drawn by avx2.cpp's `sample`, on
every CPU with AVX2).

Matmuls: a batch-1 decode step reads every weight (269 MB in bf16) to compute one row, so its floor is
the memory's read bandwidth. oneDNN's packed bf16 matmul read at about half of it for a few rows (a
batch-1 step of the embedded model: 16 of 18 ms in matmuls, against a 7.9 ms floor). `linear` lays each
weight out once as the pairs vdpbf16ps multiplies, 16 outputs per 64-byte load, so that each thread
streams a contiguous run of the weight, and it keeps a tile of 4 rows against 4 output blocks in
registers. The sums are taken in the same pair order as oneDNN's (equal on all but ~3 in 10^5 outputs,
which differ by one bf16 step), and a row's result never depends on the other rows of the call.
It was measured on a Zen 4 (AVX512-BF16, no AMX), where it is as fast as oneDNN or faster at every row
count up to 512. On CPUs with AMX the same layout is AMX's B-tile layout, and `linear` multiplies in
tiles (linear_tiles): on an AMX Xeon, the trunk's and head's 121 matmuls took 11.1-11.7 ms from 1 to 16
rows (the read-bandwidth floor) against oneDNN's 17.6-19.9 ms (and 11.4-30 ms for the pairs), with
outputs equal to oneDNN's bit for bit; 1.1-1.5x oneDNN from 20 to 128 rows, 0.9-1.2x from 256 to
2048 (noisy), 0.8x at 4096.
ALPHAMATH_DECODE_MATMUL=tiles, =pairs or =onednn chooses (A/B runs).

Attention: torch's CPU flash kernel spent ~37% of a large decode step (SBS at 8 problems: 120 rows,
24 prompts) on two small attentions per layer, at ~55 GFLOP/s where the packed linears reach ~370:
per call it packs every key block afresh for only 15 queries, then attention.py merges the prompt
and own-column halves by their log-sum-exps. The kernel does the whole softmax over both key sets in
one pass per (prompt, KV head), reads each prompt's keys once for all rows that continue it, and
writes the output rows in place (no gather, no merge). On CPUs with AMX, q.k and p.v over the prompt
run as AMX tiles from the prompt's keys and values laid out once per batch (prompt_tiles: the kernel
had re-laid the keys out for every step, layer and prompt); a 20-row step of 4 prompts went 29.3 ->
24.0 ms, a 5-row step of one prompt ~19 -> 15.1 ms. TDPBF16PS rounds a key pair's products apart from
vdpbf16ps: the outputs differ by one bf16 step in about 1 in 10^4.

Sampling: softmax, cumsum, searchsorted and a gather over [rows, 49k] fp32 took ~28 ms of a 120-row
step (13%); three vectorised passes per row over the logits pick the same token (inverse CDF with
the row's own uniform) and its log-prob in ~2 ms. Since session 38 that sampler is avx2.cpp's, one
for every CPU with AVX2 (the logits are fp32 on all of them).

A decode step's layers (decode_layers): the same kernels and torch operations as fast_llama's layer
loop, per layer decode_qkv, the cache write and decode_rest, all in one call, so no Python runs
between them (at batch 1, Python's dispatch of ~25 operations per layer was ~1.5 ms of a 10 ms step;
two calls per layer around a Python cache update left ~6% of a step at 1, 5 and 16 rows on a Zen 5).

RMSNorm and RoPE: torch computes LlamaRMSNorm's bf16 form in ~10 ops (cast, square, mean, rsqrt,
multiply, cast, scale) and the rotation in ~8, each op a dispatch of a few us at batch 1: 61 norms and
30 rotations per step took ~3.3 ms of a 24 ms batch-1 step. The kernels do each in one pass, ~1 us. The
rotation is torch's bit for bit; the norm sums squares in fp64 (see decode.cpp).

The kernels release the GIL while they run (they touch only tensors): holding it through a decode
step's kernel calls stalled every other Python thread of the process, a service's gRPC handlers and,
in-process, the concurrent searches and the value model's scoring (in-process throughput at 16
concurrent searches 46-49 -> 53 problems/min, session 24).

All are compiled on first use with torch.utils.cpp_extension (g++ and ninja; cached under
TORCH_EXTENSIONS_DIR); the Docker image builds them into ALPHAMATH_KERNEL_DIR
(`python -m alphamath.model DIR`). Where they cannot be used (fp32 attention, no AVX512-BF16,
head_dim not 64/128, no compiler) torch ops compute the same numbers, the norm's to one bf16 step
(attention.shared_prompt_attention, LocalLM._pick, fast_llama); ALPHAMATH_DECODE_KERNEL=0 forces that
path (the side-by-side benchmark).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from alphamath.model import extension
from alphamath.model.dtype import cpu_has_amx, cpu_has_fast_bf16

SOURCE = Path(__file__).with_suffix(".cpp")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mfma",
         "-fopenmp"]
_EMPTY, _EMPTY_BOOL = torch.empty(0), torch.empty(0, dtype=torch.bool)  # "none" for the kernels' optional tensors


NAME = "alphamath_decode"


_kernel = extension.Kernel(NAME, SOURCE, FLAGS, lambda: None if cpu_has_fast_bf16() else "this CPU has no AVX512-BF16",
                           "decode kernels")


kernel, build, failed = _kernel, _kernel.build, _kernel.reason  # the module (or None), compile, why None


def usable(x: torch.Tensor, head_dim: int) -> bool:
    """Can the kernel compute attention for activations like `x` (bf16 on the CPU) here?"""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and head_dim in (64, 128) and kernel() is not None


def decode_attention(q, own_k, own_v, own_valid, keys, values, prompt_len, group_of, scale: float,
                     tiles: tuple | None = None, own_of=None, root: tuple | None = None) -> torch.Tensor:
    """q [B, Hk, g, D]; own_k/own_v [R, Hk, W, D]; own_valid [B, W] bool or None (every column);
    keys/values [G, Hk, L, D]; prompt_len [G]; group_of [B] -> [B, Hk, g, D]. `tiles`: prompt_tiles
    of keys/values, for AMX (else the vdpbf16ps path). own_of [B]: the own row each query row continues
    (None: rows b * B/R .. continue own row b). `root`: (kt [Hk, D/2, Lr, 2], vt, lengths [G])
    of a prefix held once, which prompt g continues where lengths[g] > 0: its keys and values come before
    the slot's (_root_args)."""
    kt, vt = tiles or (_EMPTY, _EMPTY)
    return kernel().decode_attention(q, own_k, own_v, _EMPTY_BOOL if own_valid is None else own_valid, keys,
                                     values, prompt_len, group_of, _EMPTY if own_of is None else own_of, float(scale),
                                     kt, vt, *_root_args(root))


def _root_args(root: tuple | None) -> tuple:
    """The kernels' root arguments: a root's tiles and per-prompt lengths, or empties (no root)."""
    return root if root is not None else (_EMPTY, _EMPTY, _EMPTY)


def tiles_on() -> bool:
    """Do the matmuls and the decode attention run on AMX tiles in this process (`matmul_choice`)?"""
    return kernel() is not None and matmul_choice() == "tiles"


def prompt_tiles(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode batch's prompt K/V [G, Hk, L, D] laid out once as AMX B tiles for decode_attention:
    keys by pair of dims [G, Hk, D/2, Lq, 2] (the keys of q.k) and values by pair of keys
    [G, Hk, Lq/2, D, 2] (the values of p.v), Lq = L rounded up to 32, zeros past L. The kernel
    laid the keys out afresh for every step, layer and prompt before; a batch's prompts never change.
    The layouts' reference definition: a decode batch writes them slot by slot with `lay_tiles`, and
    the tests check both against this."""
    G, H, L, D = keys.shape
    pad = (0, 0, 0, -L % 32)
    k = torch.nn.functional.pad(keys, pad).view(G, H, -1, D // 2, 2).permute(0, 1, 3, 2, 4).contiguous()
    v = torch.nn.functional.pad(values, pad).view(G, H, -1, 2, D).permute(0, 1, 2, 4, 3).contiguous()
    return k, v


def past_tiles(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`prompt_tiles` of K/V [G, Hk, L, 64] computed in decode.cpp in one pass (a prefill lays its rows' pasts
    out per layer: torch's pad and permute had cost as much as the attention); the inputs may be slices of
    a cache (the last dim contiguous)."""
    return tuple(kernel().past_tiles(keys, values))


def lay_tiles(k: torch.Tensor, v: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor) -> None:
    """One prompt's K/V [Hk, n, D] into a prompt slab's slot kt [Hk, D/2, Lq, 2], vt [Hk, Lq/2, D, 2]:
    prompt_tiles' layouts, zeros from column n on (in place; only where tiles_on())."""
    kernel().lay_tiles(k, v, kt, vt)


def norm_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Can the kernel normalise `x` with `weight` (both bf16 on the CPU, width a multiple of 16) here?"""
    return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.shape[-1] % 16 == 0 and kernel() is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm of bf16 `x` [..., H] with bf16 `weight` [H], in one pass (fp64 sum of squares)."""
    return kernel().rms_norm(x, weight, float(eps))


def rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """qkv [B, S, H, D] bf16, cos/sin [B, S, D] bf16 -> x * cos + rotate_half(x) * sin of the first
    `heads` heads [B, S, heads, D], with torch's bf16 roundings (usable where `norm_usable` is and D % 32 == 0)."""
    return kernel().rope(qkv, cos, sin, int(heads))


MATMULS = ("tiles", "pairs", "onednn")


def matmul_choice() -> str:
    """ALPHAMATH_DECODE_MATMUL, else "tiles" on CPUs with AMX (see the module doc) and "pairs" elsewhere.
    It also switches `linear` to AMX tiles or off them, so a process computes with what it chose last."""
    env = (os.environ.get("ALPHAMATH_DECODE_MATMUL") or "").strip().lower()
    if env and env not in MATMULS:
        raise ValueError(f"ALPHAMATH_DECODE_MATMUL={env!r}: expected one of {MATMULS}")
    module = kernel()
    tiles = module is not None and cpu_has_amx() and env in ("", "tiles") and module.set_tiles(True)
    if module is not None and not tiles:
        module.set_tiles(False)
    if env == "tiles" and not tiles:
        raise ValueError("ALPHAMATH_DECODE_MATMUL=tiles needs the decode kernels on a CPU with AMX-BF16 "
                         "whose kernel grants this process the tile state")
    return env or ("tiles" if tiles else "onednn" if cpu_has_amx() else "pairs")


def linear_usable(weight: torch.Tensor) -> bool:
    """Should `linear` compute with `weight` [N, K] here: bf16 on the CPU, N a multiple of 16, K even,
    the kernels built, and tiles or pairs chosen (`matmul_choice`)?"""
    return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.dim() == 2
            and weight.shape[0] % 16 == 0 and weight.shape[1] % 2 == 0 and kernel() is not None
            and matmul_choice() in ("tiles", "pairs"))


def pack_linear(weight: torch.Tensor) -> torch.Tensor:
    """bf16 [N, K] -> [N / 16, K / 2, 16, 2], the layout `linear` reads (a copy)."""
    return kernel().pack_linear(weight.detach())


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None
           ) -> torch.Tensor:
    """x [..., K] bf16 -> x W^T + bias [..., N] bf16, W laid out by `pack_linear`. `out`: a contiguous bf16
    [>= rows, N] buffer to write into (its first rows, returned), instead of a new tensor."""
    if out is not None:
        return kernel().linear_into(x, packed, _EMPTY if bias is None else bias, out).view(*x.shape[:-1], -1)
    return kernel().linear(x, packed, _EMPTY if bias is None else bias)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a bf16 gate|up projection [..., 2I] -> [..., I], rounded as torch's two bf16 ops round."""
    return kernel().silu_mul(gate_up.contiguous())


def decode_qkv(x, norm, qkv, qkv_bias, cos, sin, hq: int, hk: int, eps: float):
    """A decode step's layer, first half: x [B, 1, H] -> q [B, hq, 1, D], k, v [B, hk, 1, D] of
    rope(qkv(rms_norm(x))), `qkv` laid out by `pack_linear`."""
    return kernel().decode_qkv(x, norm, qkv, _EMPTY if qkv_bias is None else qkv_bias, cos, sin, int(hq), int(hk),
                               float(eps))


def decode_rest(x, q, k, v, own_valid, prompts_k, prompts_v, lengths, group, scale: float,
                o, o_bias, norm, gate_up, gate_up_bias, down, down_bias, eps: float, tiles: tuple | None = None,
                own_of=None, root: tuple | None = None):
    """A decode step's layer, second half: x + o(attention over the prompts and own columns k/v), then
    + down(silu(gate) * up) with gate|up = gate_up(rms_norm(x)). The same numbers as the torch ops."""
    kt, vt = tiles or (_EMPTY, _EMPTY)
    return kernel().decode_rest(
        x, q, k, v, _EMPTY_BOOL if own_valid is None else own_valid, prompts_k, prompts_v, lengths, group,
        _EMPTY if own_of is None else own_of, float(scale), o, _EMPTY if o_bias is None else o_bias, norm, gate_up,
        _EMPTY if gate_up_bias is None else gate_up_bias, down, _EMPTY if down_bias is None else down_bias, float(eps),
        kt, vt, *_root_args(root))


def decode_layers(x, cos, sin, own_valid, weights, buffers, n: int, T: int, prompts, group, scale: float, hq: int,
                  hk: int, eps: float, final_norm, own_of=None, col=None):
    """Every decoder layer of a decode step and the final norm in one call: per layer decode_qkv, the
    rows' T new K/V columns written at column n of `buffers` [(K, V) per layer, [B, hk, >= n + T, D]],
    then decode_rest over their columns [0, n + T). x [Q, 1, H] (Q = B * T; ragged: query row r is
    own row own_of[r]'s column n + col[r], int64 [Q], decode_layers.h); `weights`
    fast_llama.layer_weights(layers, "weight"); `prompts` the step's SharedPrompts, `group` [Q] each
    query row's prompt. The same numbers as the two calls per layer."""
    kt = [t[0] for t in prompts.tiles] if prompts.tiles else []
    vt = [t[1] for t in prompts.tiles] if prompts.tiles else []
    rkt = [t[0] for t in prompts.root_tiles] if prompts.root_tiles else []
    rvt = [t[1] for t in prompts.root_tiles] if prompts.root_tiles else []
    return kernel().decode_layers(x, cos, sin, _EMPTY_BOOL if own_valid is None else own_valid, weights,
                                  [k for k, _ in buffers], [v for _, v in buffers], int(n), int(T), prompts.keys,
                                  prompts.values, prompts.lengths, group, _EMPTY if own_of is None else own_of,
                                  _EMPTY if col is None else col, kt, vt, rkt, rvt,
                                  _EMPTY if prompts.root_len is None else prompts.root_len, float(scale), int(hq),
                                  int(hk), float(eps), final_norm)
