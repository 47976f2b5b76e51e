"""The Llama trunk's forward for LocalLM's inference: the same arithmetic as transformers' Llama, in
fewer, larger operations.

It exists because a decode step of the embedded 135M model is small enough that per-operation
costs dominate it: transformers' module tree ran ~70 tensor operations per layer plus Python per
module, and re-laid every bf16 weight out for oneDNN on each matmul. Here each layer is

    x = x + o(attend(rope(qkv(norm(x)))))          qkv: q, k and v projections in one matmul
    x = x + down(act(gate) * up),  gate|up = gate_up(norm(x))

with weights laid out once (packed.py: decode.cpp's vdpbf16ps pairs on CPUs with AVX512-BF16, else
oneDNN's bf16 layout, or an fp16 copy for the few-row matmuls of decode steps where the CPU computes
fp32), norms as one fused op, RoPE applied to q and k together, and grouped-query attention folded so
K/V are never repeated (attention.py). Where the decode kernels run, a decode step's layer is two C++
calls around the cache update (decode_qkv, decode_rest) computing exactly what the loop computes: in
bf16 decode.cpp's on CPUs with AVX512-BF16, in fp32 avx2.cpp's on CPUs with AVX2 (the same
operations, equal to fp32 rounding). The
rotary embedding is transformers' own module, so every RoPE variant it knows is computed as it
computes it.
Training and every other caller use the transformers model; `tests/test_model.py` checks that
both give the same hidden states.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import DynamicCache

from alphamath.model import avx2
from alphamath.model import decode as kernel
from alphamath.model.attention import SharedPrompts, shared_prompt_attention
from alphamath.model.packed import Linear, fp16_below_rows

# Query rows a draft-verifying step may hold (FastLlama.verify_rows), and a query row's cost relative to a
# one-row step (FastLlama.row_cost, for lm/lookup.draft_length). bf16 (AMX Xeon, s26): a step of R rows cost
# ~16.5 + 0.5 R ms up to ~40 rows (1 row 16.8, 1 row + 4 drafts 18.3, 5 rows 18.8, + 2 drafts each 24.4,
# 20 rows 33.5, + 1 each 40.8). fp32 (avx2.cpp's linear_f16 on the same Xeon, s26): 1 row 24.5, + 4 drafts 28.9,
# 5 rows 28.6, + 2 each 53.8, 20 rows 75.1: ~2.5 ms a row past the first few (a Zen 2, s25: 1 row 16.9 ms,
# 5 rows 23.1, 20 rows 73.9). bf16 without AMX (decode.cpp's vdpbf16ps pairs; a Zen 4, s28: 1 row 9.5 ms,
# 5 rows 14.3, 10 rows 16.9, 20 rows 24.8, 40 rows 44.1): ~0.8 ms a row, 0.085 of a one-row step, so the
# AMX figure there made drafts look 3x cheaper than they are (at a yield of 0.35 drafts stop at 6 rows, not 20).
VERIFY_ROWS_BF16, VERIFY_ROWS_FP32 = 40, 16
ROW_COST_BF16_TILES, ROW_COST_BF16, ROW_COST_FP32 = 0.03, 0.085, 0.1


def layer_weights(layers, packed: str) -> list:
    """The decoder layers' tensors in decode_layers' order, 10 per layer (norm1, qkv, its bias, o, its bias,
    norm2, gate_up, its bias, down, its bias; a missing bias as an empty tensor), each matmul's weight as
    the kernel reads it: `packed` "weight" (decode.cpp's bf16 pairs) or "f16" (avx2.cpp's fp16 panels).
    Built once per model: the packed weights never change after loading."""
    def b(t):
        return torch.empty(0) if t is None else t

    return [t for layer in layers for t in (
        layer.norm1, getattr(layer.qkv, packed), b(layer.qkv.bias), getattr(layer.o, packed), b(layer.o.bias),
        layer.norm2, getattr(layer.gate_up, packed), b(layer.gate_up.bias), getattr(layer.down, packed),
        b(layer.down.bias))]


@dataclass
class _Layer:
    norm1: torch.Tensor
    qkv: Linear
    o: Linear
    norm2: torch.Tensor
    gate_up: Linear
    down: Linear
    act: object


def _cat_bias(*linears) -> torch.Tensor | None:
    if all(m.bias is None for m in linears):
        return None
    return torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool = False) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in fp32, cast back, scale (one fused op for the first part;
    in fp32 the scale joins it too: the same numbers, a third less time per call at batch 1). In bf16
    decode.cpp does all of it in one pass (torch's ops took ~2.6 of a 23 ms batch-1 step), with the sum
    of squares in fp64: ~5 elements in 10^6 land one bf16 step from transformers' fp32 sum. `fused`:
    the caller checked `kernel.norm_usable` once per forward (per call it cost ~0.3 ms of a step)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    if fused:
        return kernel.rms_norm(x, weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FastLlama:
    """Inference forward of a transformers LlamaForCausalLM (see module doc). Build it once per loaded
    model; it holds packed copies of the weights, so the model must not be trained while it is used."""

    @staticmethod
    def supports(lm) -> bool:
        cfg = lm.config
        return getattr(cfg, "model_type", None) == "llama" and hasattr(getattr(lm, "model", None), "rotary_emb")

    def __init__(self, lm, decode_weights: str | None = None):
        """`decode_weights`: "fp16" or "float" for few-row matmuls (packed.fp16_below_rows)."""
        m, cfg = lm.model, lm.config
        r = self.fp16_below = fp16_below_rows(lm.dtype, lm.device, decode_weights)  # rows that read fp16 weights
        self.embed = m.embed_tokens.weight.detach()
        self.rotary = m.rotary_emb
        self.hq, self.hk = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.hq
        self.scale = self.head_dim ** -0.5
        self.eps = cfg.rms_norm_eps
        self.norm = m.norm.weight.detach()
        self.layers = []
        for layer in m.layers:
            a, f = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                norm1=layer.input_layernorm.weight.detach(),
                qkv=Linear(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                           _cat_bias(a.q_proj, a.k_proj, a.v_proj), r),
                o=Linear(a.o_proj.weight, a.o_proj.bias, r),
                norm2=layer.post_attention_layernorm.weight.detach(),
                gate_up=Linear(torch.cat([f.gate_proj.weight, f.up_proj.weight]), _cat_bias(f.gate_proj, f.up_proj), r),
                down=Linear(f.down_proj.weight, f.down_proj.bias, r),
                act=f.act_fn))
        self.lm_head = Linear(lm.get_output_embeddings().weight, None, r)
        # decode.cpp's decode_qkv / decode_rest run a decode step's layer in two calls where every
        # matmul is its `linear` and the activation is SiLU (Llama's); avx2.cpp's do the same in fp32
        # where every matmul has avx2's fp16 panels; elsewhere the loop below.
        silu = self.silu = getattr(cfg, "hidden_act", None) == "silu"
        mats = [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        self.layered = silu and all(m.pairs for m in mats)
        self.layered_f32 = silu and all(m.f16 is not None for m in mats)
        # decode_layers' inputs: bf16 pairs for decode.cpp's, fp16 panels for avx2.cpp's
        self.layer_weights = (layer_weights(self.layers, "weight") if self.layered else
                              layer_weights(self.layers, "f16") if self.layered_f32 else None)

    def _mask(self, attention_mask, S: int, past: int, device) -> torch.Tensor | None:
        """Boolean [B or 1, 1, S, past + S]: key j is seen by new token s if it is real and
        j <= past + s. None where SDPA needs none: nothing padded, and one new token (it sees every
        key) or no past (SDPA's own causal mask)."""
        padded = attention_mask is not None and not bool(attention_mask.all())
        if not padded and (S == 1 or past == 0):
            return None
        real = attention_mask[:, : past + S].bool()[:, None, None, :] if padded else None
        if S == 1:
            return real
        cols = torch.arange(past + S, device=device)
        causal = (cols[None, :] <= (past + torch.arange(S, device=device))[:, None])[None, None]
        return causal if real is None else real & causal

    def _fold_mask(self, mask: torch.Tensor, S: int, dtype) -> torch.Tensor:
        """`_mask`'s boolean mask as `_attend` uses it, made once per forward: tiled over the g query heads
        folded onto each KV head, additive (0 / -inf) in the activations' dtype. Tiled and converted in
        every layer, it cost a padded prefill of 8 rows ~50 of its ~600 ms (the same numbers: SDPA
        converts a boolean mask to exactly this)."""
        g = self.hq // self.hk
        if S > 1 and g > 1:
            mask = mask.repeat(1, 1, g, 1)
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))

    def _attend(self, q, k, v, mask) -> torch.Tensor:
        """q [B, Hq, S, D], k/v [B, Hk, L, D] -> [B, S, Hq * D]; `mask` from `_fold_mask`, or None."""
        B, H, S, D = q.shape
        g = H // self.hk
        if mask is None and S > 1:  # a prompt with no past: causal, nothing padded
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=g > 1)
            return out.transpose(1, 2).reshape(B, S, H * D)
        # Fold query heads onto their KV head: q [B, Hk, g * S, D], exact, and K/V stay as they are.
        qf = q.reshape(B, self.hk, g * S, D)
        out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=self.scale)
        return out.reshape(B, H, S, D).transpose(1, 2).reshape(B, S, H * D)

    def _past_plan(self, attention_mask, B: int, S: int, past: int, device) -> "_PastPlan | None":
        """How a bf16 prefill over a cached past runs its attention in decode.cpp's kernel (`_past_attention`), or
        None where torch's SDPA runs it: no past, or a new part longer than some row's past.

        Scoring a state (the value service, each SBS or MCTS child) prefills its step's tokens after its cached
        parent. torch's flash attention ran those at 90-120 GFLOP/s on a Zen 4, decode.cpp's at 210-250 (3
        states of 45 new tokens after 650 cached: 2.46 -> 0.85 ms a layer), and value scoring's prefills took
        1.24x less in all (s46). Its own-column part is plain dot products, so a new part longer than the past
        is no faster there (1 row of 600 after 60: 8.4 against 7.0 ms). In fp32, avx2.cpp's attention was no
        faster than SDPA at any of these shapes, so fp32 keeps SDPA.

        Rows are laid out as LocalLM._extend_batch lays them, [pad | past | new | pad]; each run of consecutive
        rows whose pasts start at the same column is one kernel call, whose prompt is that past and whose own
        columns the new part."""
        if past == 0 or S == 1:
            return None
        if attention_mask is None:
            starts, n_new = torch.zeros(B, dtype=torch.long), torch.full((B,), S, dtype=torch.long)
        else:
            m = attention_mask[:, : past + S].bool().cpu()
            seen = m[:, :past]
            starts = torch.where(seen.any(1), seen.int().argmax(1), torch.full((B,), past)).long()
            n_new = m[:, past:].sum(1)
            # the pasts must be contiguous runs ending at `past`, the new tokens left-aligned after it
            cols = torch.arange(past + S)
            want = ((cols[None] >= starts[:, None]) & (cols[None] < past + n_new[:, None]))
            if not bool((want == m).all()):
                return None
        if S > int((past - starts).min()):  # a long new part: SDPA is as fast
            return None
        t = torch.arange(S)
        runs, lo = [], 0
        for i in range(1, B + 1):
            if i == B or starts[i] != starts[lo]:
                runs.append((lo, i, int(starts[lo])))
                lo = i
        idx = (t[None, :] < n_new[:, None]).reshape(-1).nonzero().squeeze(1)  # the new tokens, left-aligned in a row
        valid = t[None, :] <= (idx % S)[:, None]  # a real new token sees its row's new tokens up to itself, all real
        first = [0] + torch.cumsum(n_new, 0).tolist()
        tiled = self.head_dim == 64 and kernel.tiles_on()  # the pasts as AMX tiles (`_past_attention`)
        return _PastPlan(runs, valid.to(device), (idx // S).to(device), past, idx.to(device), first, tiled)

    def _past_attention(self, q, k, v, plan: "_PastPlan") -> torch.Tensor:
        """q [N, Hq, D], the new tokens only (`_packed_layers`); k/v [B, Hk, past + S, D] (the cache after this
        layer's update) -> [N, Hq * D]. Each new token is a query row of decode.cpp's attention: its prompt is its
        row's past, its own columns the new part up to itself.

        On AMX the pasts are laid out as tiles (`decode.past_tiles`) and q.k and p.v over them run as tile
        products, as a decode batch's prompts do: each past meets all of its row's new tokens (3 query heads
        each, ~200 query rows a call at 16 searches), where the vdpbf16ps path computes them 16 keys at a
        time. Captured calls at 16 searches (s48): 1.32-1.37 ms each on that path, 0.96-1.11 on tiles laid out by
        torch's pad and permute, 0.74-0.77 laid out in decode.cpp."""
        N, H, D = q.shape
        hk, P = self.hk, plan.past
        qr = q.reshape(N, hk, H // hk, D)
        outs = []
        for lo, hi, start in plan.runs:
            n, a, b = hi - lo, plan.first[lo], plan.first[hi]
            group = plan.rows[a:b] - lo
            pk, pv = k[lo:hi, :, start:P], v[lo:hi, :, start:P]
            outs.append(kernel.decode_attention(qr[a:b], k[lo:hi, :, P:], v[lo:hi, :, P:], plan.valid[a:b], pk, pv,
                                              torch.full((n,), P - start, dtype=torch.long), group, self.scale,
                                              tiles=kernel.past_tiles(pk, pv) if plan.tiled else None, own_of=group))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.reshape(N, H * D)

    def _packed_layers(self, input_ids, position_ids, cache, plan: "_PastPlan", norm: bool, rope: bool) -> torch.Tensor:
        """A prefill over a cached past (`_past_plan`) computing its new tokens only: rows of different lengths are
        padded to the longest in [B, S], but every matmul, norm and rotation here runs on the N real tokens
        packed [N, hidden] (a row's numbers never depend on the other rows of a call), and only the cache gets the
        padded layout (zeros at the pads). The value service's and the policy's prefills had computed 9% and 17% of
        their tokens as padding at 16 searches (s47). -> the final-normed hidden states [B, S, hidden], zeros at
        pads."""
        B, S = input_ids.shape
        hq, hk, D, idx = self.hq, self.hk, self.head_dim, plan.idx
        x = F.embedding(input_ids.reshape(-1)[idx], self.embed)  # [N, hidden]
        N = x.shape[0]
        cos, sin = self.rotary(x[None], position_ids.reshape(-1)[idx][None])  # [1, N, D]

        def padded(t):  # [N, hk, D] -> [B, hk, S, D], zeros at the pads (cache.update's layout)
            out = t.new_zeros(B * S, hk, D)
            out[idx] = t
            return out.view(B, S, hk, D).transpose(1, 2)

        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(_rms(x, layer.norm1, self.eps, norm)).view(1, N, hq + 2 * hk, D)
            qk = self._rope(qkv, cos, sin, rope)
            k, v = cache.update(padded(qk[0, :, hq:]), padded(qkv[0, :, hq + hk:]), i)
            x = self._mlp(layer, x + layer.o(self._past_attention(qk[0, :, :hq], k, v, plan)), norm)
        h = x.new_zeros(B * S, x.shape[-1])
        h[idx] = _rms(x, self.norm, self.eps, norm)
        return h.view(B, S, -1)

    @torch.inference_mode()
    def hidden(self, input_ids, attention_mask=None, past_key_values=None, position_ids=None, use_cache=True,
               prompts: SharedPrompts | None = None):
        """Last hidden states after the final norm [B, S, hidden], and the cache (appended in place):
        the same contract as ValueHeadModel.hidden. With `prompts` (a decode step, S = 1) the cache and
        `attention_mask` hold each row's own columns only, and each row also attends to its prompt's
        shared KV (attention.shared_prompt_attention); positions must then be given."""
        B, S = input_ids.shape
        if prompts is not None and (S != 1 or position_ids is None):
            raise ValueError("shared prompts serve decode steps: one new token per row, explicit positions")
        cache = past_key_values if past_key_values is not None else DynamicCache()
        past = cache.get_seq_length()
        if position_ids is None:
            position_ids = torch.arange(past, past + S, device=input_ids.device)[None].expand(B, -1)
        x = F.embedding(input_ids, self.embed)
        # decode.cpp's rope: the same bf16 numbers as the torch ops below, in one pass instead of ~8 ops
        norm = kernel.norm_usable(x, self.norm)  # decode.cpp's RMSNorm, for every norm of this forward
        rope = norm and x.dtype == torch.bfloat16 and self.head_dim % 32 == 0
        fused = prompts is not None and kernel.usable(x, self.head_dim)  # decode.cpp: bf16 with AVX512-BF16
        # a prefill over a cached past: attention in decode.cpp's kernel (`_past_plan` says when and why), the new
        # tokens alone through the rest
        plan = (self._past_plan(attention_mask, B, S, past, input_ids.device)
                if prompts is None and kernel.usable(x, self.head_dim) else None)
        if plan is not None:
            return self._packed_layers(input_ids, position_ids, cache, plan, norm, rope), cache
        cos, sin = self.rotary(x, position_ids)  # [B, S, D]
        mask = self._mask(attention_mask, S, past, input_ids.device)
        # avx2.cpp in fp32, at any rows: its fp16 panels run as fast as the fp32 weights' sgemm at 256 rows and
        # more (s44, Zen 3), and a batch's root (kv.py) needs the kernels
        f32 = prompts is not None and self.layered_f32 and avx2.usable(x, self.head_dim)
        own_valid = None if mask is None or prompts is None else mask[:, 0, 0]  # the C++ kernels take it boolean
        if f32 or (fused and rope and self.layered):  # the loop's operations, two C++ calls per layer
            return self._kernel_layers(x, cos, sin, own_valid, cache, prompts, 1), cache
        if not fused and mask is not None:  # SDPA and the shared-prompt flash kernel take it additive, in the KV dtype
            mask = self._fold_mask(mask, S, x.dtype)
        hq, hk, D = self.hq, self.hk, self.head_dim
        for i, layer in enumerate(self.layers):
            tiles = prompts.tiles[i] if prompts is not None and prompts.tiles else None
            qkv = layer.qkv(_rms(x, layer.norm1, self.eps, norm)).view(B, S, hq + 2 * hk, D)
            qk = self._rope(qkv, cos, sin, rope)
            q = qk[:, :, :hq].transpose(1, 2)
            k, v = cache.update(qk[:, :, hq:].transpose(1, 2), qkv[:, :, hq + hk:].transpose(1, 2), i)
            if prompts is None:
                x = x + layer.o(self._attend(q, k, v, mask))
            elif fused:
                o = kernel.decode_attention(q.reshape(B, hk, hq // hk, D), k, v, own_valid, prompts.keys[i],
                                            prompts.values[i], prompts.lengths, prompts.group, self.scale, tiles,
                                            root=_root(prompts, i, False))
                x = x + layer.o(o.reshape(B, 1, hq * D))
            else:
                o = shared_prompt_attention(q.reshape(B, hk, hq // hk, D), k, v, mask, prompts, i, self.scale)
                x = x + layer.o(o.reshape(B, 1, hq * D))
            x = self._mlp(layer, x, norm)
        return _rms(x, self.norm, self.eps, norm), cache

    def _rope(self, qkv: torch.Tensor, cos, sin, in_kernel: bool) -> torch.Tensor:
        """The rotated q and k heads [B, S, hq + hk, D] of a qkv projection [B, S, heads, D]; `in_kernel`:
        decode.cpp's one pass (the same bf16 numbers as the torch ops)."""
        heads = self.hq + self.hk
        if in_kernel:
            return kernel.rope(qkv, cos, sin, heads)
        qk = qkv[:, :, :heads]
        return qk * cos.unsqueeze(2) + _rotate_half(qk) * sin.unsqueeze(2)

    def _mlp(self, layer: _Layer, x: torch.Tensor, norm: bool) -> torch.Tensor:
        """x + down(act(gate) * up), gate|up = gate_up(norm2(x)); SiLU * up in decode.cpp's one pass where it runs
        (torch's silu of the strided half, then the product)."""
        gate_up = layer.gate_up(_rms(x, layer.norm2, self.eps, norm))
        if norm and self.silu:
            return x + layer.down(kernel.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return x + layer.down(layer.act(gate) * up)

    def kernel_attention(self) -> bool:
        """Do decode steps compute attention in the C++ kernels here (decode.cpp in bf16, avx2.cpp's layer kernels
        in fp32)? Only they read a batch's root (kv.py); the torch path holds every prompt whole."""
        x = self.embed[:1][None]
        if x.dtype == torch.bfloat16:
            return kernel.usable(x, self.head_dim)
        return self.layered_f32 and avx2.usable(x, self.head_dim)

    def verify_rows(self) -> int:
        """The most query rows `verify` takes at once here (0: it cannot run: no layer kernels). A step of
        few rows is bound by reading the weights, not by arithmetic, so a row's last token and its draft
        cost little more than the token alone (see VERIFY_ROWS_BF16)."""
        x = self.embed[:1][None]
        if x.dtype == torch.bfloat16:
            ok = self.layered and kernel.usable(x, self.head_dim) and kernel.norm_usable(x, self.norm)
            return VERIFY_ROWS_BF16 if ok and self.head_dim % 32 == 0 else 0
        ok = self.layered_f32 and avx2.usable(x, self.head_dim)
        return min(VERIFY_ROWS_FP32, self.fp16_below - 1) if ok else 0

    def row_cost(self) -> float:
        """A decode step's cost per query row beyond the first, relative to a one-row step."""
        if self.embed.dtype != torch.bfloat16:
            return ROW_COST_FP32
        return ROW_COST_BF16_TILES if kernel.tiles_on() else ROW_COST_BF16

    @torch.inference_mode()
    def verify(self, ids, own_of, col, positions, own_valid, cache, prompts: SharedPrompts, T: int) -> torch.Tensor:
        """A decode step that feeds each row its last sampled token and its draft (kv.py's _Batch.step): Q query
        rows, ragged (no row padded to the longest draft) -> the final-normed hidden states [Q, hidden].
        ids/own_of/col/positions [Q] int64: query r feeds ids[r] at position positions[r] as row own_of[r]'s
        step column col[r] (0 its last token, 1.. its draft); own_valid [Q, W + T] bool: query r sees its row's
        own columns in use before the step and the step's columns up to col[r]; the cache (each row's own
        columns) gains T columns per row, those no query fed zeros (masked by the caller).
        Each query is one row of the layer kernels, so it computes what a one-token step from the same
        columns computes; `verify_rows` says if they run."""
        x = F.embedding(ids[:, None], self.embed)
        cos, sin = self.rotary(x, positions[:, None])
        return self._kernel_layers(x, cos, sin, own_valid, cache, prompts, T, own_of, col).squeeze(1)

    def _kernel_layers(self, x, cos, sin, own_valid, cache, prompts: SharedPrompts, T: int, own_of=None,
                       col=None) -> torch.Tensor:
        """A decode step's layers and final norm in C++: one call for every layer when the cache's layers
        expose their buffers (decode.decode_layers in bf16, avx2.decode_layers in fp32), else two calls per
        layer around the cache update (decode.cpp's in bf16, avx2.cpp's fp16-weight ones in fp32): the
        operations of `hidden`'s loop without ~25 Python-dispatched operations per layer. x [Q, 1, hidden]: one
        position of each of B rows (T = 1: a plain step), or query r at row own_of[r]'s step column col[r]
        (`verify`); own_valid [Q, W + T] bool or None."""
        fp32, hq, hk, D = x.dtype == torch.float32, self.hq, self.hk, self.head_dim
        B = prompts.group.numel()  # rows
        group = prompts.group if own_of is None else prompts.group[own_of]
        own = [cache.layers[i] for i in range(len(self.layers))]
        if all(hasattr(layer, "buffers") for layer in own):
            # every layer in one C++ call (decode.decode_layers, avx2.decode_layers in fp32), the K/V written into
            # the cache's buffers in place (kv.py's _RoomyLayer, what decode batches hold; the kernel checks the room)
            buffers = [layer.buffers() for layer in own]
            h = (avx2 if fp32 else kernel).decode_layers(
                x, cos, sin, own_valid, self.layer_weights, [(k, v) for k, v, _ in buffers], buffers[0][2], T,
                prompts, group, self.scale, hq, hk, self.eps, self.norm, own_of, col)
            for layer in own:
                layer.advance(T)
            return h
        for i, layer in enumerate(self.layers):
            if fp32:
                q, k, v = avx2.decode_qkv(x, layer.norm1, layer.qkv.f16, layer.qkv.bias, cos, sin, hq, hk, self.eps)
            else:
                q, k, v = kernel.decode_qkv(x, layer.norm1, layer.qkv.weight, layer.qkv.bias, cos, sin, hq, hk,
                                            self.eps)
            if own_of is not None:  # ragged: each query's K/V at its row's column, zeros where no query fed one
                k, v = (t.new_zeros(B, T, hk, D).index_put_((own_of, col), t.reshape(-1, hk, D)) for t in (k, v))
            k, v = cache.update(k.reshape(B, T, hk, D).transpose(1, 2), v.reshape(B, T, hk, D).transpose(1, 2), i)
            if fp32:
                x = avx2.decode_rest(x, q, k, v, own_valid, prompts.keys[i], prompts.values[i], prompts.lengths,
                                     group, self.scale, layer.o.f16, layer.o.bias, layer.norm2, layer.gate_up.f16,
                                     layer.gate_up.bias, layer.down.f16, layer.down.bias, self.eps, own_of,
                                     _root(prompts, i, fp32))
            else:
                x = kernel.decode_rest(x, q, k, v, own_valid, prompts.keys[i], prompts.values[i], prompts.lengths,
                                       group, self.scale, layer.o.weight, layer.o.bias, layer.norm2,
                                       layer.gate_up.weight, layer.gate_up.bias, layer.down.weight, layer.down.bias,
                                       self.eps, prompts.tiles[i] if prompts.tiles else None, own_of,
                                       _root(prompts, i, fp32))
        return avx2.rms_norm(x, self.norm, self.eps) if fp32 else kernel.rms_norm(x, self.norm, self.eps)

    def step_weight_bytes(self, rows: int) -> int:
        """Bytes of weights a forward of `rows` rows reads (matmuls and norms; one embedding row each)."""
        mats = [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [self.lm_head]
        norms = [self.norm] + [n for layer in self.layers for n in (layer.norm1, layer.norm2)]
        return (sum(m.bytes_read(rows) for m in mats) + sum(n.numel() * n.element_size() for n in norms)
                + rows * self.embed.shape[1] * self.embed.element_size())

    def logits(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The LM head; `out` a buffer decode.cpp's linear may write into (packed.Linear)."""
        return self.lm_head(h, out)


@dataclass
class _PastPlan:
    """FastLlama._past_plan: runs (lo, hi, start) of rows whose pasts start at column `start`; the N new tokens
    (query rows) in row order: idx [N] their positions in the padded [B * S], valid [N, S] bool (new token t
    of a row sees its row's new tokens u <= t), rows [N] their rows, first [B + 1] where each row's start;
    past: the columns before the new part; tiled: the pasts laid out as AMX tiles (decided once a forward)."""
    runs: list
    valid: torch.Tensor
    rows: torch.Tensor
    past: int
    idx: torch.Tensor
    first: list
    tiled: bool


def _root(prompts: SharedPrompts, layer: int, fp32: bool) -> tuple | None:
    """The kernels' root arguments for one layer (SharedPrompts.root_tiles: decode.cpp's tiles in bf16, avx2.cpp's
    plain K/V in fp32), or None."""
    if prompts.root_len is None:
        return None
    kt, vt = prompts.root_tiles[layer]
    if (kt.dtype == torch.float32) != fp32:
        raise ValueError(f"a root held as {kt.dtype} for a step computing {'fp32' if fp32 else 'bf16'}")
    return kt, vt, prompts.root_len
