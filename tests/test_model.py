"""ValueHeadModel: one trunk pass for logits and values, checkpoints with and without a head, dtypes."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from alphamath.model import VALUE_HEAD_FILE, ValueHeadModel, default_dtype
from alphamath.model.dtype import cpu_has_fast_bf16

ROOT = Path(__file__).resolve().parent.parent


def decode_kernels_or_skip():
    """The decode kernels where this CPU can run them. A CPU without AVX512-BF16 (or
    ALPHAMATH_DECODE_KERNEL=0) skips; a CPU with it whose build failed is a failure, not a skip."""
    from alphamath.model import decode

    if os.environ.get("ALPHAMATH_DECODE_KERNEL", "1") == "0" or not cpu_has_fast_bf16():
        pytest.skip("decode kernels need AVX512-BF16 (and ALPHAMATH_DECODE_KERNEL unset)")
    assert decode.kernel() is not None, f"decode kernels did not load on an AVX512-BF16 CPU: {decode.failed()}"
    return decode


def avx2_kernels_or_skip():
    """avx2.py's fp32 kernels where this CPU can run them (AVX2, FMA, F16C); where it can, a failed
    build is a failure, not a skip."""
    from alphamath.model import avx2

    if os.environ.get("ALPHAMATH_DECODE_KERNEL", "1") == "0" or not avx2.cpu_ok():
        pytest.skip("the fp32 decode kernels need AVX2, FMA and F16C (and ALPHAMATH_DECODE_KERNEL unset)")
    assert avx2.kernel() is not None, f"fp32 decode kernels did not load on an AVX2 CPU: {avx2.failed()}"
    return avx2


@pytest.fixture()
def model(tiny_model_dir):
    return ValueHeadModel.from_pretrained(tiny_model_dir, dtype="fp32")


def _ids(model, text="<step>First find 3 * 12.</step>"):
    return torch.tensor([model.tokenizer(text, add_special_tokens=False)["input_ids"]])


def test_forward_logits_match_plain_lm_and_values_come_from_the_same_pass(model, tiny_model_dir):
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = _ids(model)
    torch.nn.init.normal_(model.value_head.weight, std=0.05)
    with torch.no_grad():
        out = model(ids)
        ref = plain(ids).logits
    assert out.logits.shape == ref.shape
    torch.testing.assert_close(out.logits, ref)
    assert out.values.shape == ids.shape and out.values.dtype == torch.float32
    assert out.values.abs().max() < 1 and out.values.std() > 0  # tanh range, per-position values
    with torch.no_grad():
        h, _ = model.hidden(ids)
    torch.testing.assert_close(out.values, torch.tanh(model.value_head(h)).squeeze(-1))


def test_forward_returns_cache_and_incremental_pass_matches_full(model):
    ids = _ids(model)
    with torch.no_grad():
        full = model(ids)
        first = model(ids[:, :-3], use_cache=True)
        rest = model(ids[:, -3:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(rest.logits, full.logits[:, -3:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rest.values, full.values[:, -3:], atol=1e-5, rtol=1e-4)


def test_logits_positions_keeps_one_position_per_row(model):
    ids = _ids(model)
    with torch.no_grad():
        full = model(ids)
        one = model(ids, logits_positions=torch.tensor([4]))
    assert one.logits.shape == (1, 1, full.logits.shape[-1])
    torch.testing.assert_close(one.logits[:, 0], full.logits[:, 4])


def test_fresh_head_is_zero_so_untrained_values_are_neutral(model):
    with torch.no_grad():
        out = model(_ids(model))
    assert torch.equal(out.values, torch.zeros_like(out.values))


def test_save_load_round_trip_keeps_head_lm_and_tokenizer(model, tmp_path):
    torch.nn.init.normal_(model.value_head.weight, std=0.3)
    torch.nn.init.constant_(model.value_head.bias, 0.1)
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / VALUE_HEAD_FILE).is_file()
    loaded = ValueHeadModel.from_pretrained(tmp_path / "ckpt", dtype="fp32")
    torch.testing.assert_close(loaded.value_head.weight, model.value_head.weight)
    torch.testing.assert_close(loaded.value_head.bias, model.value_head.bias)
    ids = _ids(model)
    with torch.no_grad():
        a, b = model(ids), loaded(ids)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.values, b.values)
    assert loaded.tokenizer.chat_template == model.tokenizer.chat_template


def test_checkpoint_without_head_gets_fresh_head(tiny_model_dir, tmp_path):
    assert not (tiny_model_dir / VALUE_HEAD_FILE).exists()
    m = ValueHeadModel.from_pretrained(tiny_model_dir, dtype="fp32")
    assert m.value_head.weight.shape == (1, m.config.hidden_size)
    assert float(m.value_head.weight.detach().abs().sum()) == 0.0


def test_head_of_wrong_size_is_a_clear_error(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    d = tmp_path / "bad-head"
    shutil.copytree(tiny_model_dir, d)
    save_file({"weight": torch.zeros(1, 7), "bias": torch.zeros(1)}, str(d / VALUE_HEAD_FILE))
    with pytest.raises(ValueError, match="does not fit hidden size"):
        ValueHeadModel.from_pretrained(d, dtype="fp32")


@pytest.mark.parametrize("content", [None, "config_only"])
def test_bad_dir_is_a_clear_error(tmp_path, content):
    if content == "config_only":
        (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"model dir {tmp_path} has no config.json/weights"):
        ValueHeadModel.from_pretrained(tmp_path)


def test_load_in_bf16(tiny_model_dir):
    m = ValueHeadModel.from_pretrained(tiny_model_dir, dtype="bf16")
    assert m.dtype == torch.bfloat16 and m.value_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = m(_ids(m))
    assert out.values.dtype == torch.float32  # values are reported in fp32 whatever the trunk dtype


def test_default_dtype_precedence(monkeypatch):
    monkeypatch.delenv("ALPHAMATH_DTYPE", raising=False)
    auto = default_dtype()
    assert auto == (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    assert default_dtype(device="cuda") == torch.bfloat16
    monkeypatch.setenv("ALPHAMATH_DTYPE", "fp16")
    assert default_dtype() == torch.float16
    assert default_dtype("fp32") == torch.float32  # explicit argument beats the environment
    assert default_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        default_dtype("int8")


def test_cpu_flags_parsing():
    assert cpu_has_fast_bf16("processor: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    assert cpu_has_fast_bf16("flags : fpu amx_bf16 amx_tile\n")
    assert not cpu_has_fast_bf16("flags : fpu sse avx2 avx512f\n")
    from alphamath.model.dtype import cpu_has_amx

    assert cpu_has_amx("flags : fpu avx512_bf16 amx_bf16 amx_tile\n")
    assert not cpu_has_amx("flags : fpu avx512f avx512_bf16\n")


@pytest.fixture
def plain(tiny_model_dir):
    """The same checkpoint on transformers' own SDPA attention: the reference for grouped_sdpa."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")


def test_grouped_attention_equals_transformers_sdpa_on_padded_batches(model, plain):
    """The masked grouped-query attention (queries folded per KV head, no K/V repeat) gives the same
    logits and gradients as transformers' own SDPA path, for a left-padded prefill and a cached decode step."""
    from alphamath.model.attention import GROUPED_SDPA

    assert model.lm.config._attn_implementation == GROUPED_SDPA
    assert model.lm.config.num_attention_heads > model.lm.config.num_key_value_heads  # really grouped
    a, b = _ids(model)[0].tolist(), _ids(model, "What is 2 + 3?")[0].tolist()
    width = max(len(a), len(b))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in (a, b)])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in (a, b)])
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = model.lm(ids, attention_mask=mask, position_ids=pos, use_cache=True)
    ref = plain(ids, attention_mask=mask, position_ids=pos, use_cache=True)
    valid = mask.bool()
    torch.testing.assert_close(out.logits[valid], ref.logits[valid], atol=1e-5, rtol=1e-4)
    out.logits[valid].sum().backward()
    ref.logits[valid].sum().backward()
    torch.testing.assert_close(model.lm.model.layers[0].self_attn.q_proj.weight.grad,
                               plain.model.layers[0].self_attn.q_proj.weight.grad, atol=1e-4, rtol=1e-3)
    step = torch.tensor([[5], [7]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    with torch.no_grad():
        o2 = model.lm(step, attention_mask=mask2, past_key_values=out.past_key_values, position_ids=pos[:, -1:] + 1)
        r2 = plain(step, attention_mask=mask2, past_key_values=ref.past_key_values, position_ids=pos[:, -1:] + 1)
    torch.testing.assert_close(o2.logits, r2.logits, atol=1e-5, rtol=1e-4)


def test_grouped_attention_equals_transformers_sdpa_on_unpadded_decode_steps(model, plain):
    """An unpadded decode step (one query per row, no mask: every MCTS expansion) takes the folded
    path too; its logits equal transformers' SDPA with enable_gqa, at several cached lengths."""
    ids = _ids(model).repeat(3, 1)  # three samples of one prompt
    with torch.no_grad():
        out = model.lm(ids, use_cache=True)
        ref = plain(ids, use_cache=True)
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-4)
        cache, ref_cache = out.past_key_values, ref.past_key_values
        for tok in ([5], [7], [11]):
            step = torch.tensor([tok, [tok[0] + 1], [tok[0] + 2]])
            o = model.lm(step, past_key_values=cache, use_cache=True)
            r = plain(step, past_key_values=ref_cache, use_cache=True)
            torch.testing.assert_close(o.logits, r.logits, atol=1e-5, rtol=1e-4)
            cache, ref_cache = o.past_key_values, r.past_key_values



@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fast_llama_gives_the_hidden_states_and_cache_of_transformers_llama(tiny_model_dir, dtype):
    """LocalLM's forward (alphamath/model/fast_llama.py) against transformers' on the cases LocalLM
    runs: a prompt, a padded prefill after cached pasts, and padded and unpadded decode steps."""
    from transformers import DynamicCache

    from alphamath.model.fast_llama import FastLlama
    from alphamath.model.packed import can_pack

    model = ValueHeadModel.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    assert FastLlama.supports(model.lm)
    fast = FastLlama(model.lm, decode_weights="float")
    if dtype == "bf16":  # decode.cpp's linear where it runs, else oneDNN's packed weights where they can
        from alphamath.model import decode

        head = model.lm.get_output_embeddings().weight
        assert fast.lm_head.pairs == decode.linear_usable(head)
        assert fast.lm_head.packed == (not fast.lm_head.pairs and can_pack(torch.bfloat16, torch.device("cpu")))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == "fp32" else dict(atol=3e-2, rtol=3e-2)
    torch.manual_seed(0)
    V = model.config.vocab_size

    def both(ids, mask=None, pos=None, caches=(None, None)):
        with torch.inference_mode():
            h_ref, c_ref = model.hidden(ids, attention_mask=mask, past_key_values=caches[0], position_ids=pos, use_cache=True)
            h, c = fast.hidden(ids, attention_mask=mask, past_key_values=caches[1], position_ids=pos)
        assert torch.allclose(h.float(), h_ref.float(), **tol), (h.float() - h_ref.float()).abs().max()
        for layer_ref, layer in zip(c_ref.layers, c.layers):
            assert torch.allclose(layer.keys.float(), layer_ref.keys.float(), **tol)
            assert torch.allclose(layer.values.float(), layer_ref.values.float(), **tol)
        return c_ref, c

    prompt = torch.randint(0, V, (1, 7))
    caches = both(prompt)  # a prompt: causal, nothing padded
    both(torch.randint(0, V, (1, 1)), pos=torch.tensor([[7]]), caches=caches)  # an unpadded decode step
    # Two rows after cached pasts of 3 and 5 tokens, left-padded to 5; 2 and 4 new tokens, right-padded.
    past = [torch.randn(2, model.config.num_key_value_heads, 5, fast.head_dim).to(model.dtype) for _ in range(4)]
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
    pos = torch.tensor([[3, 4, 0, 0], [5, 6, 7, 8]])
    ids = torch.randint(0, V, (2, 4))
    caches = []
    for _ in range(2):
        c = DynamicCache()
        for layer in range(model.config.num_hidden_layers):
            c.update(past[0].clone(), past[1].clone(), layer)
        caches.append(c)
    caches = both(ids, mask=mask, pos=pos, caches=tuple(caches))
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)  # a padded decode step
    both(torch.randint(0, V, (2, 1)), mask=step_mask, pos=torch.tensor([[5], [9]]), caches=caches)
    assert torch.allclose(fast.logits(torch.ones(1, model.config.hidden_size, dtype=model.dtype)).float(),
                          model.lm_head(torch.ones(1, model.config.hidden_size, dtype=model.dtype)).float(), **tol)


def test_fp16_decode_weights_serve_few_row_calls_of_fp32_cpu_models_only(monkeypatch):
    """packed.fp16_below_rows: fp16 only where the CPU computes fp32; "float" (argument or env) turns it
    off; anything else is a clear error."""
    from alphamath.model.packed import FP16_BELOW_ROWS, fp16_below_rows

    cpu = torch.device("cpu")
    monkeypatch.delenv("ALPHAMATH_DECODE_WEIGHTS", raising=False)
    assert fp16_below_rows(torch.float32, cpu) == FP16_BELOW_ROWS > 1
    assert fp16_below_rows(torch.bfloat16, cpu) == 0
    assert fp16_below_rows(torch.float32, torch.device("cuda")) == 0
    assert fp16_below_rows(torch.float32, cpu, "float") == 0
    monkeypatch.setenv("ALPHAMATH_DECODE_WEIGHTS", "float")
    assert fp16_below_rows(torch.float32, cpu) == 0
    assert fp16_below_rows(torch.float32, cpu, "fp16") == FP16_BELOW_ROWS
    with pytest.raises(ValueError, match="int4"):
        fp16_below_rows(torch.float32, cpu, "int4")


def test_fp16_linear_is_within_fp16_rounding_on_few_rows_and_exact_from_the_threshold_on():
    """packed.Linear with an fp16 copy: below `fp16_below` rows each output is within fp16's rounding of
    the weights (2^-11 of sum |x_i w_ij|); from there on it is the float matmul itself; the bias is
    added either way. A weight fp16 cannot hold keeps the float path."""
    from alphamath.model.packed import Linear

    torch.manual_seed(0)
    w, b = torch.randn(96, 64), torch.randn(96)
    lin = Linear(w, b, fp16_below=4)
    assert lin.bytes_read(1) == 96 * 64 * 2 + 96 * 4 and lin.bytes_read(4) == 96 * 64 * 4 + 96 * 4
    for x in (torch.randn(1, 64), torch.randn(1, 3, 64)):  # 3-d input: rows = all but the last dim
        ref = torch.nn.functional.linear(x, w, b)
        got = lin(x)
        assert got.shape == ref.shape and got.dtype == torch.float32
        bound = 2 ** -11 * (x.abs() @ w.abs().T) + 1e-5
        assert ((got - ref).abs() <= bound).all()
        assert not torch.equal(got, ref)  # it really read the fp16 copy
    x = torch.randn(4, 64)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, w, b))
    huge = Linear(w * 1e5, None, fp16_below=4)
    assert huge.fp16_below == 0 and torch.equal(huge(x[:1]), torch.nn.functional.linear(x[:1], w * 1e5))


def test_fast_llama_with_fp16_decode_weights_keeps_long_prefills_exact_and_decode_steps_close(tiny_model_dir):
    """FastLlama in fp32 with fp16 decode weights: a prompt of at least the threshold's rows gives
    transformers' hidden states exactly; a decode step reads fp16 weights and stays within ~2e-3 of them
    (this random model amplifies rounding more than the embedded one)."""
    from alphamath.model.fast_llama import FastLlama
    from alphamath.model.packed import FP16_BELOW_ROWS

    model = ValueHeadModel.from_pretrained(tiny_model_dir, dtype="fp32").eval()
    fast = FastLlama(model.lm, decode_weights="fp16")
    assert fast.lm_head.fp16_below == fast.layers[0].qkv.fp16_below == FP16_BELOW_ROWS
    torch.manual_seed(0)
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (1, FP16_BELOW_ROWS + 2))
    step = torch.randint(0, V, (1, 1))
    pos = torch.tensor([[prompt.shape[1]]])
    with torch.inference_mode():
        h_ref, c_ref = model.hidden(prompt, use_cache=True)
        h, c = fast.hidden(prompt)
        torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
        s_ref, _ = model.hidden(step, past_key_values=c_ref, position_ids=pos, use_cache=True)
        s, _ = fast.hidden(step, past_key_values=c, position_ids=pos)
        assert not torch.equal(s, s_ref)
        logits, ref = fast.logits(s), model.lm_head(s_ref)
        for got, want in ((s, s_ref), (logits, ref)):  # relative to the whole vector: fp16 rounds each weight by <= 2^-11
            assert float((got - want).norm() / want.norm()) < 5e-3, float((got - want).norm() / want.norm())


@pytest.mark.parametrize("one_each", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_prompt_attention_equals_softmax_over_each_rows_prompt_and_own_keys(dtype, one_each):
    """attention.shared_prompt_attention against plain softmax attention over the row's own joined keys:
    prompts of different lengths (padded), groups of different sizes, left-padded own columns; and the
    path with no gathering, where every row continues its own prompt in order."""
    from alphamath.model.attention import SharedPrompts, shared_prompt_attention

    torch.manual_seed(0)
    Hk, g, D, L, W = 2, 3, 8, 7, 5
    lens, group_of = [7, 3, 5], ([0, 1, 2] if one_each else [0, 2, 0, 1, 0, 2])
    own_lens = [5, 1, 3, 5, 2, 4][: len(group_of)]
    B, G = len(group_of), len(lens)
    pk, pv = torch.randn(G, Hk, L, D), torch.randn(G, Hk, L, D)
    for gi, n in enumerate(lens):  # the buffers' padding is zero, as _Batch writes it
        pk[gi, :, n:] = pv[gi, :, n:] = 0
    q, k, v = torch.randn(B, Hk, g, D), torch.randn(B, Hk, W, D), torch.randn(B, Hk, W, D)
    real = torch.tensor([[c >= W - n for c in range(W)] for n in own_lens])
    rows = [[b for b in range(B) if group_of[b] == gi] for gi in range(G)]
    R = max(map(len, rows))
    members = torch.tensor([r + [r[0]] * (R - len(r)) for r in rows])
    slot = torch.empty(B, dtype=torch.long)
    for gi, r in enumerate(rows):
        slot[r] = gi * R + torch.arange(len(r))
    pmask = torch.zeros(G, 1, 1, L).masked_fill((torch.arange(L)[None] >= torch.tensor(lens)[:, None])[:, None, None], float("-inf"))
    omask = torch.zeros(B, 1, 1, W).masked_fill(~real[:, None, None], float("-inf"))
    cast = [t.to(dtype) for t in (q, k, v, pk, pv, pmask, omask)]
    prompts = SharedPrompts([cast[3]], [cast[4]], cast[5], members, slot, one_each=one_each)
    got = shared_prompt_attention(cast[0], cast[1], cast[2], cast[6], prompts, 0, D ** -0.5)
    for b in range(B):
        gi, n = group_of[b], lens[group_of[b]]
        keys = torch.cat([pk[gi, :, :n], k[b][:, real[b]]], 1)
        vals = torch.cat([pv[gi, :, :n], v[b][:, real[b]]], 1)
        want = torch.softmax(q[b] @ keys.transpose(1, 2) * D ** -0.5, -1) @ vals
        tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(got[b].float(), want, **tol)


def attention_case(dtype, head_dim, group_of):
    """decode_attention's inputs: prompts of odd lengths (not multiples of the kernels' key blocks), groups
    of different sizes, left-padded own columns read through strided views of a wider buffer (as
    _RoomyLayer holds them); and the reference, softmax attention over row b's joined keys in `ref`."""
    torch.manual_seed(0)
    Hk, g, D, L, W = 3, 3, head_dim, 37, 21
    lens, own_lens = [37, 1, 20, 5], [21, 1, 3, 17, 2, 4, 9][: len(group_of)]
    B, G = len(group_of), len(lens)
    pk, pv = torch.randn(G, Hk, L, D).to(dtype), torch.randn(G, Hk, L, D).to(dtype)
    q = torch.randn(B, Hk, g, D).to(dtype)
    k = torch.randn(B, Hk, W + 11, D).to(dtype)[:, :, :W]
    v = torch.randn(B, Hk, W + 11, D).to(dtype)[:, :, :W]
    real = torch.tensor([[c >= W - n for c in range(W)] for n in own_lens])

    def want(b, valid, ref):
        gi, n = group_of[b], lens[group_of[b]]
        cols = real[b] if valid is not None else torch.ones(W, dtype=torch.bool)
        keys = torch.cat([pk[gi, :, :n], k[b][:, cols]], 1).to(ref)
        vals = torch.cat([pv[gi, :, :n], v[b][:, cols]], 1).to(ref)
        return torch.softmax(q[b].to(ref) @ keys.transpose(1, 2) * D ** -0.5, -1) @ vals

    return q, k, v, real, pk, pv, torch.tensor(lens), want


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("one_each", [False, True])
def test_decode_attention_kernel_equals_softmax_over_each_rows_prompt_and_own_keys(one_each, head_dim):
    """decode.cpp against plain fp32 softmax attention over each row's joined keys: prompts of
    odd lengths (not multiples of the kernel's 16-key blocks), groups of different sizes, left-padded own
    columns read through strided views of a wider buffer (as _RoomyLayer holds them), and a group no row
    continues. Runs where the kernel can (bf16 with AVX512-BF16); elsewhere the torch path is used."""
    kernel = decode_kernels_or_skip()
    group_of = [0, 1, 2] if one_each else [0, 2, 0, 1, 0, 2, 0]
    q, k, v, real, pk, pv, lens, want = attention_case(torch.bfloat16, head_dim, group_of)
    B, G, Hk, D = len(group_of), pk.shape[0], pk.shape[1], head_dim
    for valid in (real, None):
        got = kernel.decode_attention(q, k, v, valid, pk, pv, lens, torch.tensor(group_of), D ** -0.5)
        assert got.shape == q.shape and got.dtype == torch.bfloat16
        for b in range(B):
            torch.testing.assert_close(got[b].float(), want(b, valid, torch.float32), atol=1e-2, rtol=1e-2)
        if head_dim == 64 and kernel.tiles_on():  # AMX: the same sums from the prompt's tiles, laid out once
            tiles = kernel.prompt_tiles(pk, pv)
            assert tiles[0].shape == (G, Hk, D // 2, 64, 2) and tiles[1].shape == (G, Hk, 32, D, 2)
            one = [0] * B  # every row on the longest prompt: 21 queries, more than a 16-row tile
            for groups in (group_of, one):
                args = (q, k, v, valid, pk, pv, lens, torch.tensor(groups), D ** -0.5)
                tiled, pairs = kernel.decode_attention(*args, tiles), kernel.decode_attention(*args)
                # TDPBF16PS and vdpbf16ps round a pair's products apart: at most one bf16 step, rarely
                step = 2.0 ** -7 * pairs.float().abs().clamp_min(2.0 ** -20)
                assert ((tiled.float() - pairs.float()).abs() <= step).all()
                assert (tiled == pairs).float().mean() >= 0.999


def test_decode_attention_scores_a_rows_queries_alike_in_every_block_split():
    """R rows on one prompt make a task of 3R queries, which the score kernel takes in near-equal blocks of up to 16
    (3: one block, 9: one, 18: 9 + 9, 33: 11 + 11 + 11). A row's numbers must not depend on how many rows share its
    prompt: each R equals the reference, and its rows equal the same rows computed among 11, bit for bit."""
    kernel = decode_kernels_or_skip()
    torch.manual_seed(5)
    Hk, g, D, L, W, B = 3, 3, 64, 45, 7, 11
    pk, pv = (torch.randn(1, Hk, L, D).to(torch.bfloat16) for _ in range(2))
    q = torch.randn(B, Hk, g, D).to(torch.bfloat16)
    k, v = (torch.randn(B, Hk, W, D).to(torch.bfloat16) for _ in range(2))
    lens = torch.tensor([L])
    every = kernel.decode_attention(q, k, v, None, pk, pv, lens, torch.zeros(B, dtype=torch.long), D ** -0.5)
    for R in (1, 3, 5, 6, 11):
        got = kernel.decode_attention(q[:R], k[:R], v[:R], None, pk, pv, lens, torch.zeros(R, dtype=torch.long),
                                      D ** -0.5)
        assert torch.equal(got, every[:R])
        for b in range(R):
            keys, vals = torch.cat([pk[0], k[b]], 1).float(), torch.cat([pv[0], v[b]], 1).float()
            want = torch.softmax(q[b].float() @ keys.transpose(1, 2) * D ** -0.5, -1) @ vals
            torch.testing.assert_close(got[b].float(), want, atol=1e-2, rtol=1e-2)


def _rooted_prompts(head_dim: int, R0: int, dtype):
    """One decode step's attention inputs over prompts that open with one R0-token root: each prompt whole,
    and as slots holding what follows the root (rooted prompts) or the whole prompt (the third, unrooted);
    suffixes of odd lengths and of one token; 3 rows a prompt, 20 own columns a row, ~70% of them valid."""
    from types import SimpleNamespace
    g = torch.Generator().manual_seed(3)
    Hk, q_heads, D, W = 3, 3, head_dim, 20
    suffix, rooted, per = [13, 1, 40, 7, 29], [True, True, False, True, True], 3
    G, B = len(suffix), len(suffix) * per
    rk, rv = (torch.randn(Hk, R0, D, generator=g).to(dtype) for _ in range(2))
    sk, sv = ([torch.randn(Hk, n, D, generator=g).to(dtype) for n in suffix] for _ in range(2))
    whole_k, whole_v, slot_k, slot_v = (torch.zeros(G, Hk, R0 + max(suffix), D, dtype=dtype) for _ in range(4))
    held = []
    for i, n in enumerate(suffix):
        whole_k[i, :, :R0 + n], whole_v[i, :, :R0 + n] = torch.cat([rk, sk[i]], 1), torch.cat([rv, sv[i]], 1)
        start = R0 if rooted[i] else 0
        slot_k[i, :, :R0 + n - start] = whole_k[i, :, start:R0 + n]
        slot_v[i, :, :R0 + n - start] = whole_v[i, :, start:R0 + n]
        held.append(R0 + n - start)
    q = torch.randn(B, Hk, q_heads, D, generator=g).to(dtype)
    own_k, own_v = (torch.randn(B, Hk, W, D, generator=g).to(dtype) for _ in range(2))
    valid = torch.rand(B, W, generator=g) < 0.7
    valid[:, -1] = True
    return SimpleNamespace(q=q, own_k=own_k, own_v=own_v, valid=valid, group_of=torch.arange(B) // per, rk=rk, rv=rv,
                           R0=R0, D=D, whole_k=whole_k, whole_v=whole_v, slot_k=slot_k, slot_v=slot_v, held=held,
                           suffix=suffix, rooted=rooted, per=per)


def _exact_attention(c, b: int) -> torch.Tensor:
    """Row b's attention over its whole prompt and its valid own columns, in fp64 (c: _rooted_prompts)."""
    i = b // c.per
    k = torch.cat([c.whole_k[i, :, :c.R0 + c.suffix[i]], c.own_k[b][:, c.valid[b]]], 1).double()
    v = torch.cat([c.whole_v[i, :, :c.R0 + c.suffix[i]], c.own_v[b][:, c.valid[b]]], 1).double()
    return torch.softmax(c.q[b].double() @ k.transpose(1, 2) * c.D ** -0.5, -1) @ v


@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_attention_over_a_root_held_once_equals_it_over_whole_prompts(head_dim):
    """A decode batch's root (kv.py's _Batch): prompts that continue one prefix hold only the rest in their
    slots and the prefix once, laid out as prompt_tiles. decode.cpp must compute what it computes over the
    whole prompts, on both paths (vdpbf16ps pairs; AMX tiles where they run, head size 64): rooted and
    unrooted prompts in one step (root_len 0 holds a prompt whole), suffixes of odd lengths and of one token,
    a root that is no multiple of the 32-key tiles, and exact fp32 attention."""
    decode = decode_kernels_or_skip()
    bf = torch.bfloat16
    c = _rooted_prompts(head_dim, 70, bf)
    q, own_k, own_v, valid, group_of, rk, rv, R0, D = c.q, c.own_k, c.own_v, c.valid, c.group_of, c.rk, c.rv, c.R0, c.D
    whole_k, whole_v, slot_k, slot_v, held, suffix, rooted = (c.whole_k, c.whole_v, c.slot_k, c.slot_v, c.held,
                                                             c.suffix, c.rooted)
    Hk, G, B = rk.shape[0], len(suffix), len(group_of)
    Lr = -(-R0 // 32) * 32
    kt, vt = rk.new_empty(Hk, D // 2, Lr, 2), rk.new_empty(Hk, Lr // 2, D, 2)
    decode.lay_tiles(rk, rv, kt, vt)
    root = (kt, vt, torch.tensor([R0 if r else 0 for r in rooted]))
    paths = [False] + ([True] if D == 64 and decode.tiles_on() else [])
    for tiled in paths:
        whole = decode.decode_attention(q, own_k, own_v, valid, whole_k, whole_v,
                                        torch.tensor([R0 + n for n in suffix]), group_of, D ** -0.5,
                                        decode.prompt_tiles(whole_k, whole_v) if tiled else None)
        got = decode.decode_attention(q, own_k, own_v, valid, slot_k, slot_v, torch.tensor(held), group_of,
                                      D ** -0.5, decode.prompt_tiles(slot_k, slot_v) if tiled else None, root=root)
        step = 2.0 ** -7 * whole.float().abs().clamp_min(2.0 ** -20)  # one bf16 step: sums in another order
        assert ((got.float() - whole.float()).abs() <= step).all() and (got == whole).float().mean() >= 0.99
        for b in range(B):
            torch.testing.assert_close(got[b].double(), _exact_attention(c, b), atol=1e-2, rtol=1e-2)
    with pytest.raises(RuntimeError, match="root_len out of range"):
        decode.decode_attention(q, own_k, own_v, valid, slot_k, slot_v, torch.tensor(held), group_of, D ** -0.5,
                                root=(kt, vt, torch.tensor([Lr + 1] * G)))


@pytest.mark.parametrize("kernels", ["decode", "avx2"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_attention_split_into_row_spans_computes_the_same_numbers(head_dim, kernels):
    """With fewer (prompt, KV head) tasks than twice the threads (an MCTS step of one leaf, batch 1 with drafts),
    both kernel sets split each prompt's rows into spans so that no thread idles (attention_args.h's row_spans):
    at 8 threads these prompts' rows are split, at 1 they are not, and every output is the same bit for bit,
    rooted prompts and whole ones in one step, on every path (decode.cpp's pairs and AMX tiles; avx2.cpp)."""
    bf16 = kernels == "decode"
    mod = decode_kernels_or_skip() if bf16 else avx2_kernels_or_skip()
    c = _rooted_prompts(head_dim, 70 if bf16 else 69, torch.bfloat16 if bf16 else torch.float32)
    D, Hk = c.D, c.rk.shape[0]
    assert len(c.suffix) * Hk < 16 and max(torch.bincount(c.group_of)) > 1  # 8 threads split the rows
    root_len = torch.tensor([c.R0 if r else 0 for r in c.rooted])
    if bf16:
        Lr = -(-c.R0 // 32) * 32
        kt, vt = c.rk.new_empty(Hk, D // 2, Lr, 2), c.rk.new_empty(Hk, Lr // 2, D, 2)
        mod.lay_tiles(c.rk, c.rv, kt, vt)
        root = (kt, vt, root_len)
        paths = [False] + ([True] if D == 64 and mod.tiles_on() else [])
    else:
        root, paths = (c.rk, c.rv, root_len), [False]
    threads = torch.get_num_threads()
    try:
        for tiled in paths:
            tiles = (mod.prompt_tiles(c.slot_k, c.slot_v),) if tiled else (None,) if bf16 else ()
            outs = []
            for n in (1, 8):
                torch.set_num_threads(n)
                outs.append(mod.decode_attention(c.q, c.own_k, c.own_v, c.valid, c.slot_k, c.slot_v,
                                                 torch.tensor(c.held), c.group_of, D ** -0.5, *tiles, root=root))
            bits = torch.int16 if bf16 else torch.int32
            assert torch.equal(outs[0].view(bits), outs[1].view(bits)) and not outs[0].isnan().any()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_avx2_decode_attention_over_a_root_held_once_equals_it_over_whole_prompts(head_dim):
    """avx2.cpp's fp32 attention over a batch's root (kv.py's _Batch: the prefix held once as [Hk, Lr, D], each
    rooted prompt's slot holding the rest) computes what it computes over the whole prompts: the root's keys
    come first, so the scores are in the same order. Rooted and unrooted prompts in one step (root_len 0
    holds a prompt whole), suffixes of odd lengths and of one token, a root that is no multiple of the 8-key
    blocks; against exact attention too; a root_len past the root is an error."""
    avx2 = avx2_kernels_or_skip()
    c = _rooted_prompts(head_dim, 69, torch.float32)
    q, own_k, own_v, valid, group_of, rk, rv, R0, D = c.q, c.own_k, c.own_v, c.valid, c.group_of, c.rk, c.rv, c.R0, c.D
    whole_k, whole_v, slot_k, slot_v, held, suffix, rooted = (c.whole_k, c.whole_v, c.slot_k, c.slot_v, c.held,
                                                             c.suffix, c.rooted)
    G, B = len(suffix), len(group_of)
    root = (rk, rv, torch.tensor([R0 if r else 0 for r in rooted]))
    whole = avx2.decode_attention(q, own_k, own_v, valid, whole_k, whole_v, torch.tensor([R0 + n for n in suffix]),
                                  group_of, D ** -0.5)
    got = avx2.decode_attention(q, own_k, own_v, valid, slot_k, slot_v, torch.tensor(held), group_of, D ** -0.5,
                                root=root)
    torch.testing.assert_close(got, whole, atol=1e-6, rtol=1e-5)  # one key's sum may reduce in another order
    for b in range(B):
        torch.testing.assert_close(got[b].double(), _exact_attention(c, b), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="root_len out of range"):
        avx2.decode_attention(q, own_k, own_v, valid, slot_k, slot_v, torch.tensor(held), group_of, D ** -0.5,
                              root=(rk, rv, torch.tensor([R0 + 1] * G)))


def test_decode_attention_kernel_rejects_what_it_cannot_compute():
    """Wrong dtypes or shapes are a clear error from the kernel, never a wrong answer."""
    kernel = decode_kernels_or_skip()
    q, kv = torch.zeros(2, 3, 3, 64).bfloat16(), torch.zeros(2, 3, 4, 64).bfloat16()
    pk = torch.zeros(1, 3, 5, 64).bfloat16()
    ok = dict(own_valid=None, prompt_len=torch.tensor([5]), group_of=torch.tensor([0, 0]))
    with pytest.raises(RuntimeError, match="bf16"):
        kernel.decode_attention(q.float(), kv, kv, ok["own_valid"], pk, pk, ok["prompt_len"], ok["group_of"], 0.125)
    with pytest.raises(RuntimeError, match="group_of out of range"):
        kernel.decode_attention(q, kv, kv, None, pk, pk, ok["prompt_len"], torch.tensor([0, 1]), 0.125)
    with pytest.raises(RuntimeError, match="prompt_len out of range"):
        kernel.decode_attention(q, kv, kv, None, pk, pk, torch.tensor([6]), ok["group_of"], 0.125)


def test_sample_kernel_draws_the_inverse_cdf_token_and_its_log_prob():
    """avx2.cpp's sampler against torch's inverse CDF over softmax(logits / T): the same token for the same
    uniform (away from a boundary, where fp32 sums in another order may round either way), its exact
    log-prob, a vocabulary that is not a multiple of the kernel's 8-wide blocks, and u at both ends; bf16
    logits give exactly what their fp32 copy gives."""
    avx2 = avx2_kernels_or_skip()
    torch.manual_seed(0)
    B, V = 64, 1003
    logits = torch.randn(B, V) * 3
    logits[0, 7] = 40.0  # one token holds nearly all the mass
    for T in (1.0, 0.7, 1.3):
        u = torch.rand(B)
        u[1], u[2] = 0.0, 1.0 - 2 ** -24
        toks, logp = avx2.sample(logits, u, T)
        probs = torch.softmax(logits.double() / T, -1)
        cdf = probs.cumsum(-1)
        want = torch.searchsorted(cdf, u.double().unsqueeze(1), right=True).squeeze(1).clamp(max=V - 1)
        gap = (cdf - u.double().unsqueeze(1)).abs().min(-1).values  # distance of u to the nearest boundary
        clear = gap > 1e-5
        assert clear.sum() > B // 2
        assert torch.equal(toks[clear], want[clear])
        torch.testing.assert_close(logp.double(), probs.log().gather(1, toks.unsqueeze(1)).squeeze(1), atol=1e-4, rtol=1e-5)
        assert toks[0] == 7 and toks[1] == probs[1].nonzero()[0]
        # bf16 logits (a bf16 model's head) are read as they are: the draws of their exact fp32 copy
        half = logits.bfloat16()
        toks16, logp16 = avx2.sample(half, u, T)
        toks32, logp32 = avx2.sample(half.float(), u, T)
        assert torch.equal(toks16, toks32) and torch.equal(logp16, logp32)
    with pytest.raises(RuntimeError, match="temperature > 0"):
        avx2.sample(logits, u, 0.0)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        avx2.sample(logits.double(), u, 1.0)


def test_rms_norm_kernel_is_llama_rms_norm_with_an_fp64_sum_of_squares():
    """decode.cpp's RMSNorm: LlamaRMSNorm's bf16 roundings (normalise in fp32, cast, scale) with the sum
    of squares in fp64, equal to that formula in torch element for element, for decode rows, a prefill
    split over threads, and large and tiny magnitudes; and within one bf16 step of transformers'
    LlamaRMSNorm (fp32 sum) everywhere, equal on all but a few elements in 10^4."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    decode = decode_kernels_or_skip()
    torch.manual_seed(0)
    H, eps = 576, 1e-5
    norm = LlamaRMSNorm(H, eps=eps).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(H) * 0.5 + 1)
    differ, total = 0, 0
    for shape, scale in (((1, 1, H), 1.0), ((20, 1, H), 30.0), ((2, 300, H), 1e-3), ((64, 1, H), 1.0)):
        x = (torch.randn(*shape) * scale).to(torch.bfloat16)
        x[..., 7] *= 50  # an outlier channel, as real activations have
        got = decode.rms_norm(x, norm.weight, eps)
        inv = (1 / torch.sqrt((x.double() ** 2).sum(-1, keepdim=True) / H + eps)).float()
        want = (norm.weight.float() * (x.float() * inv).to(torch.bfloat16).float()).to(torch.bfloat16)
        assert torch.equal(got, want)
        with torch.no_grad():
            llama = norm(x)
        step = llama.float().abs() * 2 ** -7  # one bf16 step (8 significant bits)
        assert ((got.float() - llama.float()).abs() <= step).all()
        differ, total = differ + int((got != llama).sum()), total + got.numel()
    assert differ <= total * 1e-3
    assert decode.norm_usable(x, norm.weight) and not decode.norm_usable(x.float(), norm.weight)


def test_rope_kernel_equals_the_torch_rotation_bit_for_bit():
    """decode.cpp's rope against fast_llama's torch ops (x * cos + rotate_half(x) * sin in bf16) on the
    q and k heads of a q|k|v projection: equal for decode rows and a prefill, v heads untouched."""
    from alphamath.model.fast_llama import _rotate_half

    decode = decode_kernels_or_skip()
    torch.manual_seed(0)
    hq, hk, D = 9, 3, 64
    for B, S in ((1, 1), (20, 1), (2, 300)):
        qkv = (torch.randn(B, S, hq + 2 * hk, D) * 4).to(torch.bfloat16)
        angle = torch.rand(B, S, D) * 100
        cos, sin = angle.cos().to(torch.bfloat16), angle.sin().to(torch.bfloat16)
        qk = qkv[:, :, : hq + hk]
        want = qk * cos.unsqueeze(2) + _rotate_half(qk) * sin.unsqueeze(2)
        assert torch.equal(decode.rope(qkv, cos, sin, hq + hk), want)


def test_silu_mul_kernel_equals_torch_silu_times_up_bit_for_bit():
    """decode.cpp's silu_mul (a decode layer's MLP activation in one pass) against at::silu(gate) * up in
    bf16: equal for every finite bf16 gate value and for random rows. Gates below 2^-120 are left out: they
    or their SiLU are denormal, which the bf16 conversion instruction flushes to zero, as in every decode kernel
    (activations are never that small)."""
    decode = decode_kernels_or_skip()
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    every = every[torch.isfinite(every) & ((every.float().abs() >= 2 ** -120) | (every == 0))]
    gate = every[: every.numel() // 1536 * 1536].reshape(-1, 1, 1536)
    gen = torch.Generator().manual_seed(0)  # |up| >= 1, so no product of a normal SiLU is denormal
    up = ((1 + 3 * torch.rand(gate.shape, generator=gen)) * torch.randn(gate.shape, generator=gen).sign()).bfloat16()
    for g, u in ((gate, up), ((torch.randn(5, 1, 1536) * 4).to(torch.bfloat16), torch.randn(5, 1, 1536).bfloat16())):
        got = decode.kernel().silu_mul(torch.cat([g, u], -1).contiguous())
        assert got.shape == g.shape and torch.equal(got, torch.nn.functional.silu(g) * u)


def test_linear_kernel_is_the_matmul_to_bf16_rounding_and_computes_each_row_alone(monkeypatch):
    """decode.cpp's linear: x W^T (+ bias) within fp32 summation and one bf16 rounding of the exact
    product, oneDNN's bf16 matmul to one bf16 step, and each row exactly what it is alone (a decode
    step's rows do not move one another's samples)."""
    decode = decode_kernels_or_skip()
    torch.manual_seed(0)
    N, K = 80, 200
    w = (torch.randn(N, K) * 0.05).bfloat16()
    bias = torch.randn(N).bfloat16()
    x = (torch.randn(9, K) * 3).bfloat16()
    packed = decode.pack_linear(w)
    assert packed.shape == (N // 16, K // 2, 16, 2) and torch.equal(packed[1, 3, 5], w[16 + 5, 6:8])
    for b in (None, bias):
        out = decode.linear(x, packed, b)
        assert out.dtype == torch.bfloat16 and out.shape == (9, N)
        exact = x.double() @ w.double().T + (0 if b is None else b.double())
        bound = 2.0 ** -8 * exact.abs() + K * 2.0 ** -23 * (x.double().abs() @ w.double().abs().T) + 1e-30
        assert ((out.double() - exact).abs() <= bound).all()
        onednn = torch.nn.functional.linear(x, w, b)
        step = 2.0 ** -7 * onednn.float().abs().clamp_min(1e-30)
        assert ((out.float() - onednn.float()).abs() <= step).all()
        assert (out == onednn).float().mean() >= 0.999
        for m in range(1, 10):  # every prefix of the batch, and each row alone, bit for bit
            assert torch.equal(decode.linear(x[:m], packed, b), out[:m])
            assert torch.equal(decode.linear(x[m - 1:m], packed, b), out[m - 1:m])
    assert decode.linear(x.view(3, 3, K), packed, None).shape == (3, 3, N)
    buf = torch.full((12, N), 7.0, dtype=torch.bfloat16)  # into a reused buffer: its first rows, the same numbers
    into = decode.linear(x, packed, bias, out=buf)
    assert into.data_ptr() == buf.data_ptr() and torch.equal(into, decode.linear(x, packed, bias))
    assert (buf[9:] == 7).all() and decode.linear(x.view(3, 3, K), packed, None, out=buf).shape == (3, 3, N)
    with pytest.raises(RuntimeError, match="first rows"):
        decode.linear(x, packed, None, out=buf[:4])
    monkeypatch.setenv("ALPHAMATH_DECODE_MATMUL", "pairs")
    assert decode.linear_usable(w) and not decode.linear_usable(w[:72]) and not decode.linear_usable(w.float())
    monkeypatch.setenv("ALPHAMATH_DECODE_MATMUL", "onednn")
    assert not decode.linear_usable(w)
    monkeypatch.setenv("ALPHAMATH_DECODE_MATMUL", "int4")
    with pytest.raises(ValueError, match="expected one of"):
        decode.linear_usable(w)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        decode.pack_linear(w[:72])
    with pytest.raises(RuntimeError, match="x \\[..., 200\\]"):
        decode.linear(x[:, :100], packed, None)


def test_past_tiles_lays_cache_slices_out_as_prompt_tiles_does():
    """decode.past_tiles (a prefill's pasts, laid out in one pass) equals prompt_tiles, the layouts' reference
    definition, on slices of a cache (strided rows and heads, the last dim contiguous), for lengths that end
    inside a key pair, on a 32-key tile's edge and past several tiles."""
    decode = decode_kernels_or_skip()
    torch.manual_seed(0)
    for G, n in ((1, 1), (3, 31), (2, 32), (4, 333)):
        cache = torch.randn(G + 1, 3, n + 7, 64).bfloat16()
        k, v = cache[1:, :, 3:3 + n], (2 * cache)[:G, :, 4:4 + n]
        kt, vt = decode.past_tiles(k, v)
        want_k, want_v = decode.prompt_tiles(k.contiguous(), v.contiguous())
        assert torch.equal(kt, want_k) and torch.equal(vt, want_v)


def test_linear_kernel_with_amx_tiles_equals_onednn_bit_for_bit(monkeypatch):
    """On CPUs with AMX, decode.cpp's linear multiplies the pairs layout as AMX tiles: the same sums as
    oneDNN's AMX matmul, so the same bf16 outputs, for row counts that fill, split and overrun the
    16-row tiles and the 512-row spans, with a tail of output blocks; each row as it is alone."""
    decode = decode_kernels_or_skip()
    monkeypatch.setattr(decode, "cpu_has_amx", lambda: False)
    monkeypatch.setenv("ALPHAMATH_DECODE_MATMUL", "tiles")
    with pytest.raises(ValueError, match="needs the decode kernels on a CPU with AMX"):
        decode.matmul_choice()
    monkeypatch.undo()
    from alphamath.model.dtype import cpu_has_amx
    from alphamath.model.packed import Linear
    if not cpu_has_amx():
        pytest.skip("AMX tiles need a CPU with AMX-BF16")
    if not decode.kernel().set_tiles(True):  # a seccomp profile may refuse arch_prctl: oneDNN then serves
        monkeypatch.delenv("ALPHAMATH_DECODE_MATMUL", raising=False)
        assert decode.matmul_choice() == "onednn" and not decode.tiles_on()
        pytest.skip("this process was not granted the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)")
    torch.manual_seed(0)
    N, K = 80, 192  # 5 blocks of 16 outputs (a group of 4 and a tail of 1), 6 chunks of 32
    w = (torch.randn(N, K) * 0.05).bfloat16()
    bias = torch.randn(N).bfloat16()
    x = (torch.randn(600, K) * 3).bfloat16()
    monkeypatch.setenv("ALPHAMATH_DECODE_MATMUL", "onednn")
    onednn = Linear(w, bias)
    assert onednn.packed and not onednn.pairs
    monkeypatch.setenv("ALPHAMATH_DECODE_MATMUL", "tiles")
    assert decode.matmul_choice() == "tiles"
    packed = decode.pack_linear(w)
    for rows in (1, 5, 16, 17, 40, 600):
        assert torch.equal(decode.linear(x[:rows], packed, bias), onednn(x[:rows]))
    out = decode.linear(x, packed, None)
    for r in (0, 15, 16, 511, 512, 599):
        assert torch.equal(decode.linear(x[r:r + 1], packed, None), out[r:r + 1])
    monkeypatch.setenv("ALPHAMATH_DECODE_MATMUL", "pairs")  # tiles off: vdpbf16ps, within a bf16 step
    assert decode.matmul_choice() == "pairs"
    pairs = decode.linear(x[:40], packed, None)
    assert ((pairs.float() - out[:40].float()).abs() <= 2.0 ** -7 * out[:40].float().abs().clamp_min(1e-30)).all()
    monkeypatch.delenv("ALPHAMATH_DECODE_MATMUL")
    assert decode.matmul_choice() == "tiles"  # and linear is back on this CPU's default


@pytest.fixture(scope="module")
def kernel_model_dir(tmp_path_factory, tiny_tokenizer):
    """A 2-layer Llama whose shapes the decode kernels serve (head_dim 64, GQA 2q/1kv), random weights."""
    from tests.conftest import save_random_llama

    return save_random_llama(tmp_path_factory.mktemp("kernel-llama"), tiny_tokenizer, hidden_size=128,
                             intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


def test_decode_layer_kernels_sample_what_the_layer_loop_samples_bit_for_bit(kernel_model_dir, monkeypatch):
    """fast_llama runs a decode step's layers in one C++ call (decode_layers: decode_qkv, the cache write
    and decode_rest per layer); its torch loop over the same kernels must give the same tokens and
    log-probs, exactly."""
    decode = decode_kernels_or_skip()
    from alphamath.lm import LocalLM

    calls = []
    real = decode.decode_layers
    monkeypatch.setattr(decode, "decode_layers", lambda *a: (calls.append(1), real(*a))[1])
    monkeypatch.setenv("ALPHAMATH_DECODE_MATMUL", "pairs")  # the default off AMX CPUs
    lm = LocalLM(kernel_model_dir, dtype="bf16")
    assert lm._fast.layered
    prompts = ["Question: what is 2 + 3?", "Question: what is 7 * 6 minus 5, and then halved?"]
    kw = dict(temperature=1.0, max_new_tokens=12, seed=3)
    layered = lm.generate(prompts, 3, **kw)
    assert len(calls) >= 11  # one call per decode step
    lm.reset_cache()
    lm._fast.layered, seen = False, len(calls)
    loop = lm.generate(prompts, 3, **kw)
    assert len(calls) == seen
    for a, b in zip(layered, loop):
        assert [(s.text, s.token_count, s.cumulative_logprob) for s in a] == \
            [(s.text, s.token_count, s.cumulative_logprob) for s in b]


def test_a_bf16_prefill_over_cached_pasts_attends_in_the_decode_kernel_as_transformers_does(kernel_model_dir,
                                                                                           monkeypatch):
    """A bf16 prefill after cached pasts (LocalLM._extend_batch's layout [pad | past | new | pad], pasts of
    different lengths) computes its attention in decode.cpp's kernel, each new token a query row whose prompt is
    its row's past: the same hidden states and cache as transformers' forward, a kernel call per run of rows
    whose pasts start at the same column, over the real new tokens only. Where a new part is longer than a row's
    past, SDPA computes it."""
    from transformers import DynamicCache

    from alphamath.model.fast_llama import FastLlama

    kern = decode_kernels_or_skip()
    dtype = "bf16"
    calls = []
    real = kern.decode_attention
    monkeypatch.setattr(kern, "decode_attention",
                        lambda *a, **k: (calls.append((a[0].shape[0], k.get("tiles") is not None)), real(*a, **k))[1])
    model = ValueHeadModel.from_pretrained(kernel_model_dir, dtype=dtype).eval()
    fast = FastLlama(model.lm, decode_weights="float")
    tol = dict(atol=3e-2, rtol=3e-2)
    torch.manual_seed(0)
    cfg = model.config
    V, H, D = cfg.vocab_size, cfg.num_key_value_heads, fast.head_dim
    past_len, S = 9, 4

    def run(mask, pos, ids):
        past = [torch.randn(3, H, past_len, D).to(model.dtype) for _ in range(2 * cfg.num_hidden_layers)]
        caches = []
        for _ in range(2):
            c = DynamicCache()
            for layer in range(cfg.num_hidden_layers):
                c.update(past[2 * layer].clone(), past[2 * layer + 1].clone(), layer)
            caches.append(c)
        with torch.inference_mode():
            h_ref, c_ref = model.hidden(ids, attention_mask=mask, past_key_values=caches[0], position_ids=pos,
                                        use_cache=True)
            h, c = fast.hidden(ids, attention_mask=mask, past_key_values=caches[1], position_ids=pos)
        real = mask.bool()  # padding's states are never read: compared where the tokens are real
        torch.testing.assert_close(h.float()[real[:, past_len:]], h_ref.float()[real[:, past_len:]], **tol)
        for layer_ref, layer in zip(c_ref.layers, c.layers):
            for got, want in ((layer.keys, layer_ref.keys), (layer.values, layer_ref.values)):
                torch.testing.assert_close(got.float().transpose(1, 2)[real], want.float().transpose(1, 2)[real], **tol)

    # Pasts of 9, 9 and 6 tokens (the last left-padded), 4, 2 and 3 new tokens (right-padded).
    mask = torch.tensor([[1] * 9 + [1, 1, 1, 1], [1] * 9 + [1, 1, 0, 0], [0, 0, 0] + [1] * 6 + [1, 1, 1, 0]])
    pos = torch.tensor([[9, 10, 11, 12], [9, 10, 0, 0], [6, 7, 8, 0]])
    run(mask, pos, torch.randint(0, V, (3, S)))
    # two runs of rows (pasts from column 0, from column 3), each query row a real new token (4 + 2, then 3): the
    # pads are not computed; on AMX the pasts are laid out as tiles
    tiled = D == 64 and kern.tiles_on()
    assert calls == [(6, tiled), (3, tiled)] * cfg.num_hidden_layers
    calls.clear()
    mask[2, :6] = 0  # a past of 3 tokens, shorter than the new part: SDPA
    pos[2] = torch.tensor([3, 4, 5, 0])
    run(mask, pos, torch.randint(0, V, (3, S)))
    assert calls == []


def test_decode_steps_write_their_logits_into_one_reused_buffer_and_sample_the_same_tokens(kernel_model_dir,
                                                                                            monkeypatch):
    """A bf16 decode step's logits go into one buffer the LM keeps (LocalLM._logits(step=True)), overwritten by
    the next step's: the same tokens and log-probs as fresh tensors, from one allocation."""
    decode_kernels_or_skip()
    from alphamath.lm import LocalLM

    monkeypatch.setenv("ALPHAMATH_DECODE_MATMUL", "pairs")
    lm = LocalLM(kernel_model_dir, dtype="bf16")
    assert lm._fast.lm_head.pairs
    prompts = ["Question: what is 2 + 3?", "Question: what is 7 * 6 minus 5, and then halved?"]
    kw = dict(temperature=1.0, max_new_tokens=12, seed=3)
    buffers = []
    real = lm._fast.logits
    monkeypatch.setattr(lm._fast, "logits", lambda h, out=None: (buffers.append(out), real(h, out))[1])
    reused = lm.generate(prompts, 3, **kw)
    steps = [b for b in buffers if b is not None]
    assert len(steps) >= 11 and len({b.data_ptr() for b in steps}) == 1
    lm.reset_cache()
    monkeypatch.setattr(lm._fast, "logits", lambda h, out=None: real(h))  # a fresh tensor every step
    fresh = lm.generate(prompts, 3, **kw)
    for a, b in zip(reused, fresh):
        assert [(s.text, s.token_count, s.cumulative_logprob) for s in a] == \
            [(s.text, s.token_count, s.cumulative_logprob) for s in b]


def test_decode_kernels_load_prebuilt_from_the_image_directory(tmp_path):
    """Pods have no compiler and a read-only root: a process given ALPHAMATH_KERNEL_DIR loads the image's
    build from there (here with an empty torch extensions cache, where a JIT build would land)."""
    import subprocess
    import sys

    decode = decode_kernels_or_skip()
    (tmp_path / "image").mkdir()
    shutil.copy(decode.kernel().__file__, tmp_path / "image" / f"{decode.NAME}.so")
    code = ("import torch; from alphamath.model import decode; m = decode.kernel(); "
            "y = m.rms_norm(torch.ones(2, 16).bfloat16(), torch.ones(16).bfloat16(), 1e-5); "
            "print(m.__file__, 'x'.join(map(str, y.shape)))")
    env = {**os.environ, "ALPHAMATH_KERNEL_DIR": str(tmp_path / "image"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "jit")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tmp_path / "image" / f"{decode.NAME}.so"), "2x16"]
    assert not (tmp_path / "jit").exists()  # nothing was compiled


def test_avx2_linear_is_the_fp16_weights_matmul_and_computes_each_row_alone():
    """avx2.linear_f16: fp32 rows times the fp16-rounded weight, fp32 sums (within fp32 rounding of the
    exact products), bias added; K past one chunk of k (256) and not a multiple of it; every row count
    through the 6-row tiles and their remainders gives each row what it gets alone, bit for bit (above 12
    rows the tiles read each chunk converted to fp32 once, with fewer they convert it themselves)."""
    avx2 = avx2_kernels_or_skip()
    torch.manual_seed(0)
    w, b = torch.randn(48, 600), torch.randn(48)
    packed = avx2.pack_f16(w)
    assert packed.shape == (3, 600, 16) and packed.dtype == torch.float16
    x = torch.randn(13, 600)
    got = avx2.linear_f16(x, packed, b)
    exact = x.double() @ w.half().double().T + b.double()
    bound = 1e-6 * (x.abs().double() @ w.abs().double().T) + 1e-6
    assert got.dtype == torch.float32 and ((got.double() - exact).abs() <= bound).all()
    for r in range(13):
        assert torch.equal(avx2.linear_f16(x[r:r + 1], packed, b), got[r:r + 1])
    for m in (2, 5, 6, 7, 12):
        assert torch.equal(avx2.linear_f16(x[:m], packed, b), got[:m])
    no_bias = avx2.linear_f16(x.view(13, 1, 600), packed, None)
    assert no_bias.shape == (13, 1, 48)
    torch.testing.assert_close(no_bias.view(13, 48) + b, got, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="last dim"):
        avx2.linear_f16(torch.randn(2, 599), packed, None)


def test_avx2_rms_norm_and_rope_are_the_torch_operations():
    """avx2.rms_norm against F.rms_norm (fp32), avx2.rope against transformers' rotation of the q and k
    heads of a q|k|v projection."""
    avx2 = avx2_kernels_or_skip()
    torch.manual_seed(0)
    x, w = torch.randn(3, 2, 128) * 4, torch.randn(128)
    torch.testing.assert_close(avx2.rms_norm(x, w, 1e-5), torch.nn.functional.rms_norm(x, (128,), w, 1e-5),
                               atol=2e-6, rtol=2e-6)
    qkv, cos, sin = torch.randn(2, 1, 5, 64), torch.randn(2, 1, 64), torch.randn(2, 1, 64)
    rot = torch.cat([-qkv[..., 32:], qkv[..., :32]], -1)
    want = (qkv * cos.unsqueeze(2) + rot * sin.unsqueeze(2))[:, :, :3]
    torch.testing.assert_close(avx2.rope(qkv, cos, sin, 3), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_avx2_decode_attention_equals_softmax_over_each_rows_prompt_and_own_keys(head_dim):
    """avx2.decode_attention against plain fp64 softmax attention over each row's joined keys: prompts
    of odd lengths (not multiples of its 8-key blocks), groups of different sizes, left-padded own
    columns read through strided views of a wider buffer, and a prompt no row continues."""
    avx2 = avx2_kernels_or_skip()
    group_of = [0, 2, 0, 1, 0, 2, 0]
    q, k, v, real, pk, pv, lens, want = attention_case(torch.float32, head_dim, group_of)
    for valid in (real, None):
        got = avx2.decode_attention(q, k, v, valid, pk, pv, lens, torch.tensor(group_of), head_dim ** -0.5)
        assert got.shape == q.shape and got.dtype == torch.float32
        for b in range(len(group_of)):
            torch.testing.assert_close(got[b].double(), want(b, valid, torch.float64), atol=2e-6, rtol=2e-6)
    with pytest.raises(RuntimeError, match="fp32"):
        avx2.decode_attention(q.bfloat16(), k, v, None, pk, pv, lens, torch.tensor(group_of), 0.1)


def test_avx2_decode_layers_sample_what_the_layer_loop_samples(kernel_model_dir, monkeypatch):
    """In fp32, fast_llama runs a decode step's layers in one C++ call (avx2.decode_layers: decode_qkv, the
    cache write and decode_rest per layer, fp16 weights). Its two calls per layer, where a cache has no
    buffers to write in place, must give the same samples bit for bit; its torch loop (fp16 weights
    through the same linear_f16) the same tokens, and log-probs equal to fp32 rounding."""
    avx2 = avx2_kernels_or_skip()
    from alphamath.lm import LocalLM
    from alphamath.lm import kv

    calls = []
    real = avx2.decode_layers
    monkeypatch.setattr(avx2, "decode_layers", lambda *a: (calls.append(1), real(*a))[1])
    lm = LocalLM(kernel_model_dir, dtype="fp32", decode_weights="fp16")  # the suite defaults to float weights
    assert lm._fast.layered_f32 and lm._fast.lm_head.f16 is not None
    prompts = ["Question: what is 2 + 3?", "Question: what is 7 * 6 minus 5, and then halved?"]
    kw = dict(temperature=1.0, max_new_tokens=12, seed=3)
    layered = lm.generate(prompts, 3, **kw)
    assert len(calls) >= 11  # one call per decode step
    lm.reset_cache()
    with monkeypatch.context() as m:
        m.delattr(kv._RoomyLayer, "buffers")
        seen = len(calls)
        two_calls = lm.generate(prompts, 3, **kw)
    assert len(calls) == seen
    for a, b in zip(layered, two_calls):
        assert [(s.text, s.token_count, s.cumulative_logprob) for s in a] == \
            [(s.text, s.token_count, s.cumulative_logprob) for s in b]
    lm.reset_cache()
    lm._fast.layered_f32, seen = False, len(calls)
    loop = lm.generate(prompts, 3, **kw)
    assert len(calls) == seen
    for a, b in zip(layered, loop):
        assert [(s.text, s.token_count) for s in a] == [(s.text, s.token_count) for s in b]
        for x, y in zip(a, b):
            assert abs(x.cumulative_logprob - y.cumulative_logprob) <= 1e-4 * max(1.0, abs(y.cumulative_logprob))


@pytest.mark.parametrize("matmul,two_calls", [("tiles", False), ("tiles", True), ("pairs", False)])
def test_a_decode_batch_holding_its_root_once_samples_and_stores_what_whole_prompts_do(kernel_model_dir, monkeypatch,
                                                                                     matmul, two_calls):
    """Prompts that open with one long prefix (as every question's few-shot prompt does) share a decode batch's
    root (kv.py's _Batch: the prefix held once, the rest in each prompt's slot). It must sample what the
    batch samples with each prompt held whole, and store the same KV in the prefix cache, also where the
    prompt was evicted before its rows finished (the store then joins root, slot and own columns).
    two_calls: the layers in two kernel calls around the cache update, not decode_layers' one call; matmul:
    decode.cpp's AMX tiles (where the CPU has them) or its vdpbf16ps pairs."""
    decode = decode_kernels_or_skip()
    from alphamath.model.dtype import cpu_has_amx
    if matmul == "tiles" and not (cpu_has_amx() and decode.kernel().set_tiles(True)):
        pytest.skip("AMX tiles need a CPU with AMX-BF16 and the tile state granted")
    monkeypatch.setenv("ALPHAMATH_DECODE_MATMUL", matmul)
    _root_run_samples_and_stores_what_whole_prompts_do(kernel_model_dir, monkeypatch, "bf16", two_calls,
                                                      matmul == "tiles", 2e-2)


@pytest.mark.parametrize("two_calls", [False, True])
def test_an_fp32_decode_batch_holding_its_root_once_samples_and_stores_what_whole_prompts_do(
        kernel_model_dir, monkeypatch, two_calls):
    """The same in fp32, where avx2.cpp's layer kernels compute the step (CPUs without AVX512-BF16)."""
    avx2_kernels_or_skip()
    _root_run_samples_and_stores_what_whole_prompts_do(kernel_model_dir, monkeypatch, "fp32", two_calls, False, 1e-4)


def _root_run_samples_and_stores_what_whole_prompts_do(model_dir, monkeypatch, dtype, two_calls, tiles, tol):
    """Two runs of the same generate: the first holds a root, the second (ROOT_MIN past any prompt) none."""
    from alphamath.lm import LocalLM
    from alphamath.lm import kv

    if two_calls:
        monkeypatch.delattr(kv._RoomyLayer, "buffers")
    roots = []
    take = kv._Batch._take_root
    monkeypatch.setattr(kv._Batch, "_take_root", lambda self, rows: (take(self, rows), roots.append(self.root))[0])
    shared = "You are a careful tutor: solve each problem step by step, and check every step twice. " * 5
    texts = [shared + "Question: what is 7 * 6 minus 5?", shared + "Question: what is 2 + 3, doubled?"]
    kw = dict(temperature=1.0, max_new_tokens=16, seed=3)
    runs, root_min_default = [], kv.ROOT_MIN
    for root_min in (root_min_default, 10 ** 9):
        monkeypatch.setattr(kv, "ROOT_MIN", root_min)
        lm = LocalLM(model_dir, dtype=dtype, max_cached_tokens=150,  # too few for both prompts
                     decode_weights="fp16")  # fp32: the layer kernels read fp16 panels
        assert lm._root and lm._prompt_tiles == tiles
        out = lm.generate(texts, 3, **kw)
        stored = {}
        for text, samples in zip(texts, out):
            for smp in samples:
                tokens = lm.encode(text + smp.text)
                m, kv_, _ = lm.cache.match(tokens)
                stored[(text, smp.text)] = (m, kv_)
        runs.append((out, stored))
    assert len(roots) == 1 and roots[0] >= root_min_default  # the first run held a root; the second, none
    (with_root, kept), (whole, kept_whole) = runs
    for a, b in zip(with_root, whole):
        assert [(s.text, s.token_count) for s in a] == [(s.text, s.token_count) for s in b]
        for x, y in zip(a, b):
            assert abs(x.cumulative_logprob - y.cumulative_logprob) <= tol * max(1.0, abs(y.cumulative_logprob))
    assert kept.keys() == kept_whole.keys()
    for key, (m, kv_) in kept.items():
        m2, kv2 = kept_whole[key]
        assert m == m2
        for (k, v), (k2, v2) in zip(kv_ or [], kv2 or []):
            torch.testing.assert_close(k.float(), k2.float(), atol=tol, rtol=tol)
            torch.testing.assert_close(v.float(), v2.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,prompts,two_calls", [("bf16", 1, False), ("bf16", 2, False), ("fp32", 1, False),
                                                     ("fp32", 2, True)])
def test_verified_drafts_sample_what_one_token_steps_sample(kernel_model_dir, monkeypatch, dtype, prompts, two_calls):
    """Drafts fed and verified in one step (FastLlama.verify, kv.py's _Batch.step) must sample the tokens
    that one-token steps sample, with their log-probs, whether a draft is right, wrong at its end, wrong
    throughout, or shorter than its neighbours' (a ragged step: no row is padded to the longest draft); the
    columns of rejected drafts and of shorter drafts are holes that later steps, the room squeeze and the
    prefix cache skip, so every stored KV equals an uncached forward's. two_calls: the layers in two
    kernel calls around the cache update (a cache without buffers), not decode_layers' one call."""
    (decode_kernels_or_skip if dtype == "bf16" else avx2_kernels_or_skip)()
    from alphamath.lm import LocalLM
    from alphamath.lm import kv
    from alphamath.lm.kv import _Batch, _Decoding

    if two_calls:
        monkeypatch.delattr(kv._RoomyLayer, "buffers")

    lm = LocalLM(kernel_model_dir, dtype=dtype, decode_weights="fp16")
    assert lm.draft_rows >= 16
    texts = ["Question: what is 2 + 3?", "Question: what is 7 * 6 minus 5, and then halved?"][:prompts]
    kw = dict(temperature=1.0, max_new_tokens=40, seed=3)
    truth, steps, squeezes = {}, [], []
    finished = lm._finished

    def spy(smp, tok, *a):
        done = finished(smp, tok, *a)
        if done:
            truth[(tuple(smp.prompt.tokens), smp.seed_key)] = (list(smp.prompt.tokens), list(smp.tokens))
        return done

    monkeypatch.setattr(lm, "_finished", spy)
    step, select = _Batch.step, _Batch._select
    monkeypatch.setattr(_Batch, "step", lambda self, lm_: (steps.append(1), step(self, lm_))[1])
    monkeypatch.setattr(_Batch, "_select", lambda self, *a: (squeezes.append(1), select(self, *a))[1])
    lm.draft_rows = 0
    plain = lm.generate(texts, 3, **kw)
    plain_steps, reference = len(steps), dict(truth)
    plain_kv = {key: [(k.clone(), v.clone()) for k, v in lm.cache.match(p + t[:-1])[1]] for key, (p, t) in truth.items()}
    calls = []

    def oracle(self, k):  # the true continuation; every third draft wrong at its end, every third throughout;
        calls.append(1)   # every fourth cut to one token, every fifth none
        _, tokens = reference[(tuple(self.prompt.tokens), self.seed_key)]
        d = tokens[len(self.tokens):len(self.tokens) + k]
        if d and len(calls) % 3 == 1:
            d[-1] = (d[-1] + 1) % lm._fast.embed.shape[0]
        elif len(calls) % 3 == 2:
            d = [(t + 7) % lm._fast.embed.shape[0] for t in d]
        return d[:1] if len(calls) % 4 == 0 else [] if len(calls) % 5 == 0 else d

    monkeypatch.setattr(_Decoding, "next_draft", oracle)
    verify, ragged = lm._fast.verify, []

    def spy_verify(ids, own_of, col, *a):  # a ragged step feeds fewer queries than rows x its widest draft
        T = a[-1]
        ragged.append(len(ids) < (int(own_of.max()) + 1) * T or len(set(own_of.tolist())) <= int(own_of.max()))
        return verify(ids, own_of, col, *a)

    monkeypatch.setattr(lm._fast, "verify", spy_verify)
    lm.reset_cache()
    # 6 rows: drafts of 1; 3 rows: of 4. The row cost is pinned to AMX's (FastLlama.row_cost): the draft
    # rule's pricing is not under test here, and at fp32's or bf16-without-tiles' cost 6 rows draft nothing
    from alphamath.model.fast_llama import ROW_COST_BF16_TILES
    lm.row_cost = ROW_COST_BF16_TILES
    lm.draft_rows, steps[:], squeezes[:], truth = 16, [], [], {}
    drafted = lm.generate(texts, 3, **kw)
    assert 0 < lm.usage.draft_accepted < lm.usage.draft_tokens and len(steps) < plain_steps  # accepted and rejected
    assert squeezes  # the rows ran out of room and were squeezed at least once
    assert any(ragged)  # rows of different draft lengths, or finished rows, in one verifying step
    tol = 2e-2 if dtype == "bf16" else 1e-4  # bf16: where a column sits changes the attention's sum order
    for a, b in zip(drafted, plain):
        assert [(s.text, s.token_count, s.finish_reason) for s in a] == [(s.text, s.token_count, s.finish_reason) for s in b]
        for x, y in zip(a, b):
            assert x.cumulative_logprob == pytest.approx(y.cumulative_logprob, abs=tol * x.token_count)
    assert truth == reference
    for key, (prompt_ids, tokens) in truth.items():  # the stored KV: as one-token steps stored it
        fed = prompt_ids + tokens[:-1]
        m, kv, _ = lm.cache.match(fed)
        assert m == len(fed)
        for (k, v), (pk, pv) in zip(kv, plain_kv[key]):
            torch.testing.assert_close(k, pk, atol=tol, rtol=tol)
            torch.testing.assert_close(v, pv, atol=tol, rtol=tol)


def test_avx2_kernels_load_prebuilt_from_the_image_directory(tmp_path):
    """As decode.cpp's: a process given ALPHAMATH_KERNEL_DIR loads the image's build of avx2.cpp."""
    import subprocess
    import sys

    avx2 = avx2_kernels_or_skip()
    (tmp_path / "image").mkdir()
    shutil.copy(avx2.kernel().__file__, tmp_path / "image" / f"{avx2.NAME}.so")
    code = ("import torch; from alphamath.model import avx2; m = avx2.kernel(); "
            "print(m.__file__, m.rms_norm(torch.full((1, 8), 2.0), torch.ones(8), 0.0)[0, 0].item())")
    env = {**os.environ, "ALPHAMATH_KERNEL_DIR": str(tmp_path / "image"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "jit")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tmp_path / "image" / f"{avx2.NAME}.so"), "1.0"]
    assert not (tmp_path / "jit").exists()
