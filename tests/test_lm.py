"""LocalLM: exact token accounting of the prefix cache, generation semantics, and value scoring."""
from __future__ import annotations

import os
import shutil
import threading
import time

import pytest
import torch

from alphamath.interfaces import Sample
from alphamath.lm import LocalLM, PrefixCache
from alphamath.lm.kv import _Batch
from alphamath.lm.lock import _FairLock
from alphamath.model import ValueHeadModel
from alphamath.steps import STOP, render_prompt
from alphamath.local import LocalPolicy, LocalValue
from tests.baselines import NaivePolicy, NaiveValue

QUESTION = "Tom has 3 boxes with 12 apples each. He gives away 7 apples. How many apples are left?"


@pytest.fixture(scope="module")
def head_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a non-zero value head, so value tests compare real numbers."""
    d = tmp_path_factory.mktemp("tiny-head")
    shutil.copytree(tiny_model_dir, d, dirs_exist_ok=True)
    m = ValueHeadModel.from_pretrained(d, dtype="fp32")
    torch.manual_seed(1)
    torch.nn.init.normal_(m.value_head.weight, std=0.1)
    m.save_pretrained(d)
    return d


@pytest.fixture()
def lm(head_model_dir):
    return LocalLM(head_model_dir, dtype="fp32")


def short_prompt(lm, question="What is 2 + 3?"):
    return lm.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                            add_generation_prompt=True) + "<step>"


def hf_greedy(lm, prompt, max_new_tokens):
    """Reference: HF generate, greedy, with its raw per-step logits."""
    ids = torch.tensor([lm.encode(prompt)])
    out = lm.model.lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                               eos_token_id=sorted(lm.eos_ids), pad_token_id=min(lm.eos_ids),
                               output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, ids.shape[1]:].tolist()
    logprob = sum(float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.logits, new))
    return new, logprob


def same(a: list[list[Sample]], b: list[list[Sample]]) -> bool:
    """Equal texts, lengths and finish reasons; logprobs equal up to float noise of batch shapes."""
    return len(a) == len(b) and all(
        len(x) == len(y) and all(
            (s.text, s.token_count, s.finish_reason) == (t.text, t.token_count, t.finish_reason)
            and s.cumulative_logprob == pytest.approx(t.cumulative_logprob, abs=1e-4) for s, t in zip(x, y))
        for x, y in zip(a, b))


def full_value(lm, text):
    """Reference: value head at the last token from one uncached forward over the whole text."""
    with torch.no_grad():
        out = lm.model(torch.tensor([lm.encode(text)]))
    return float(out.values[0, -1])



def test_fp16_decode_weights_generate_and_score_with_the_same_token_accounting(head_model_dir):
    """LocalLM reading fp16 weights in few-row calls (the fp32 CPU default): it reads about half the
    float weight bytes per step, computes exactly the tokens the float engine computes, and a child
    scored on KV its fp16 decode steps wrote stays within a few 1e-3 of an uncached full forward."""
    half = LocalLM(head_model_dir, dtype="fp32", decode_weights="fp16")
    fp = LocalLM(head_model_dir, dtype="fp32", decode_weights="float")
    assert half.step_weight_bytes(1) < 0.55 * fp.step_weight_bytes(1)
    assert half.step_weight_bytes(1 << 10) == fp.step_weight_bytes(1 << 10)  # long prefills read the float weights
    prompt = short_prompt(half)
    outs = [lm.generate([prompt], 3, stop=[], temperature=1.0, max_new_tokens=8, seed=5)[0] for lm in (half, fp)]
    assert [s.token_count for s in outs[0]] == [s.token_count for s in outs[1]] == [8, 8, 8]
    assert half.usage.prefill_tokens == fp.usage.prefill_tokens and half.usage.decode_tokens == fp.usage.decode_tokens
    child = prompt + outs[0][0].text + "\n<output>\n5\n</output>\n</step>\n"
    before = half.usage.prefill_tokens
    [v] = half.score([child])
    assert half.usage.prefill_tokens - before <= len(half.encode("\n<output>\n5\n</output>\n</step>\n")) + 2
    assert v == pytest.approx(full_value(half, child), abs=5e-3)
    assert v != full_value(half, child)  # the fp16 weights were read


# ---- prefix cache data structure -----------------------------------------------------------------
def _kv(tokens, layers=2):
    """Fake KV whose entries encode the token id, so slices can be checked by value."""
    t = torch.tensor(tokens, dtype=torch.float32)
    return [(t.view(1, -1, 1).repeat(2, 1, 3) + l, -t.view(1, -1, 1).repeat(2, 1, 3)) for l in range(layers)]


def test_prefix_cache_longest_prefix_partial_edges_and_shared_storage():
    c = PrefixCache(max_tokens=100)
    c.insert([1, 2, 3, 4], _kv([1, 2, 3, 4]), torch.tensor([.1, .2, .3, .4]))
    c.insert([1, 2, 7], _kv([1, 2, 7]), torch.tensor([.1, .2, .7]))  # splits the edge after [1, 2]
    assert c.tokens == 5  # [1, 2] stored once
    m, kv, vals = c.match([1, 2, 3, 9, 9])
    assert m == 3
    assert torch.equal(kv[1][0][0, :, 0], torch.tensor([2., 3., 4.]))  # layer 1 keys = token + 1
    assert torch.equal(vals, torch.tensor([.1, .2, .3]))
    m, kv, _ = c.match([1, 2, 7, 8])
    assert m == 3 and torch.equal(kv[0][1][0, :, 0], torch.tensor([-1., -2., -7.]))
    assert c.match([5, 1])[0] == 0
    assert c.match_length([1, 2, 3, 4, 5]) == 4
    m, parts, vals = c.match_parts([1, 2, 3, 9])  # the path's edges as views, in order: [1, 2] then [3]
    assert m == 3 and [k.shape[1] for k, _ in parts[1]] == [2, 1]
    assert torch.equal(torch.cat([k for k, _ in parts[1]], 1), c.match([1, 2, 3, 9])[1][1][0])
    assert c.match_parts([5])[1] is None


def test_prefix_cache_branch_length_is_the_prefix_every_cached_sequence_starting_alike_shares():
    """A decode batch's root (kv.py): the first edge on a sequence's path, if the sequence holds it whole."""
    c = PrefixCache(max_tokens=100)
    assert c.branch_length([1, 2, 3]) == 0 and c.branch_length([]) == 0  # nothing cached
    c.insert([1, 2, 3, 4], _kv([1, 2, 3, 4]), torch.tensor([.1, .2, .3, .4]))
    assert c.branch_length([1, 2, 3, 4, 5]) == 4  # one sequence: all of it
    assert c.branch_length([1, 2, 3]) == 0  # does not hold the edge whole
    c.insert([1, 2, 7], _kv([1, 2, 7]), torch.tensor([.1, .2, .7]))
    assert c.branch_length([1, 2, 3, 4, 5]) == 2 == c.branch_length([1, 2, 9])  # they branch after [1, 2]
    assert c.branch_length([5, 1, 2]) == 0  # starts unlike every cached sequence


def test_prefix_cache_insert_past_a_cached_prefix_takes_only_the_new_kv():
    c = PrefixCache(max_tokens=100)
    c.insert([1, 2, 3], _kv([1, 2, 3]), torch.tensor([.1, .2, .3]))
    c.insert([1, 2, 3, 4, 5], _kv([4, 5]), torch.tensor([.4, .5]), start=3)  # kv covers tokens[3:]
    m, kv, vals = c.match([1, 2, 3, 4, 5])
    assert m == 5 and c.tokens == 5
    assert torch.equal(kv[0][0][0, :, 0], torch.tensor([1., 2., 3., 4., 5.]))
    assert torch.equal(vals, torch.tensor([.1, .2, .3, .4, .5]))
    with pytest.raises(ValueError, match="only 0 of those tokens are cached"):
        c.insert([9, 8, 7], _kv([7]), torch.tensor([.7]), start=2)
    assert c.tokens == 5


def test_prefix_cache_evicts_least_recently_used_leaves():
    c = PrefixCache(max_tokens=8)
    c.insert([1, 2, 3], _kv([1, 2, 3]), torch.zeros(3))
    c.insert([4, 5, 6], _kv([4, 5, 6]), torch.zeros(3))
    c.match([1, 2, 3])  # [1, 2, 3] is now more recent than [4, 5, 6]
    c.insert([7, 8, 9], _kv([7, 8, 9]), torch.zeros(3))
    assert c.tokens == 6
    assert c.match_length([4, 5, 6]) == 0
    assert c.match_length([1, 2, 3]) == 3 and c.match_length([7, 8, 9]) == 3


# ---- token accounting ----------------------------------------------------------------------------
def test_generating_n_samples_computes_the_prompt_once(lm):
    prompt = render_prompt(QUESTION, lm.tokenizer)
    out = lm.generate([prompt], 3, stop=[], temperature=1.0, max_new_tokens=6, seed=0)
    assert len(out) == 1 and len(out[0]) == 3
    assert lm.usage.prefill_tokens == len(lm.encode(prompt))
    # decoding feeds every sampled token but the last, one batch row per sample
    assert lm.usage.decode_tokens == sum(s.token_count - 1 for s in out[0])
    # asking again only recomputes the prompt's last token (its logits are not cached)
    lm.generate([prompt], 2, stop=[], temperature=1.0, max_new_tokens=3, seed=1)
    assert lm.usage.prefill_tokens == len(lm.encode(prompt)) + 1


def test_scoring_a_child_after_generation_computes_only_the_appended_tokens(lm):
    prompt = short_prompt(lm)
    gen, _ = hf_greedy(lm, prompt, 8)
    [[sample]] = lm.generate([prompt], 1, stop=[], temperature=0, max_new_tokens=8)
    child = prompt + sample.text + "\n<output>\n5\n</output>\n</step>\n"
    before = lm.usage.prefill_tokens
    [v] = lm.score([child])
    computed = lm.usage.prefill_tokens - before
    child_ids, fed = lm.encode(child), lm.encode(prompt) + gen[:-1]  # generation fed all but its last token
    common = next((i for i, (a, b) in enumerate(zip(child_ids, fed)) if a != b), min(len(child_ids), len(fed)))
    assert computed == len(child_ids) - common
    assert computed <= len(lm.encode("\n<output>\n5\n</output>\n</step>\n")) + 2
    assert v == pytest.approx(full_value(lm, child), abs=1e-5)
    # scoring it again is free: values of cached tokens are kept with their KV
    assert lm.score([child]) == [v] and lm.usage.prefill_tokens - before == computed


def test_scoring_reads_no_lm_head_and_generating_does(lm, monkeypatch):
    """A prefill computes the LM head only for rows whose next token is drawn: scoring states (the value
    model's every call) needs values, not logits, and the head is a fifth of the model's weights."""
    heads = []
    real = lm._logits
    monkeypatch.setattr(lm, "_logits", lambda h, *a, **k: (heads.append(h.shape[0]), real(h, *a, **k))[1])
    prompt = short_prompt(lm, "What is 4 + 4?")
    states = [prompt + "The sum is 8.", prompt + "The sum is 9."]
    values = lm.score(states)
    assert heads == [] and lm.usage.prefill_tokens > 0
    assert values[0] == pytest.approx(full_value(lm, states[0]), abs=1e-5)
    lm.generate([short_prompt(lm, "What is 5 + 5?")], 2, stop=[], temperature=0, max_new_tokens=2)
    assert heads and heads[0] == 1  # the prompt's prefill: its last token's logits


def test_siblings_share_the_parent_prefix(lm):
    parent = short_prompt(lm)
    kids = [parent + t for t in ("First add the numbers.</step>\n", "Think about it.</step>\n")]
    assert all(lm.encode(k)[:len(lm.encode(parent))] == lm.encode(parent) for k in kids)
    lm.score([parent])
    before = lm.usage.prefill_tokens
    values = lm.score(kids)
    assert lm.usage.prefill_tokens - before == sum(len(lm.encode(k)) - len(lm.encode(parent)) for k in kids)
    assert values == pytest.approx([full_value(lm, k) for k in kids], abs=1e-5)


# ---- generation semantics ------------------------------------------------------------------------
def test_greedy_equals_hf_generate_and_logprob_is_raw_model_distribution(lm):
    prompt = render_prompt(QUESTION, lm.tokenizer)
    gen, logprob = hf_greedy(lm, prompt, 12)
    samples = lm.generate([prompt], 3, stop=[], temperature=0, max_new_tokens=12)[0]
    assert samples[0] == samples[1] == samples[2]  # greedy: n identical samples, decoded once
    assert lm.usage.decode_tokens == samples[0].token_count - 1
    s = samples[0]
    assert s.text == lm.tokenizer.decode(gen, skip_special_tokens=True)
    assert s.token_count == len(gen)
    assert s.cumulative_logprob == pytest.approx(logprob, abs=1e-3)
    assert s.finish_reason == ("eos" if gen[-1] in lm.eos_ids else "length")


def test_stop_string_spanning_tokens_truncates_right_after_it(lm):
    prompt = short_prompt(lm)
    gen, _ = hf_greedy(lm, prompt, 16)
    pieces = [lm.tokenizer.decode(gen[:i], skip_special_tokens=True) for i in range(len(gen) + 1)]
    # a stop string made of the last char of token 5's text and the first of token 6's
    a, b = pieces[5], pieces[6]
    assert len(b) > len(a) > 0
    stop = a[-1] + b[len(a)]
    expected = b[: b.find(stop) + len(stop)]
    [[s]] = lm.generate([prompt], 1, stop=["never-matches", stop], temperature=0, max_new_tokens=16)
    assert s.finish_reason == "stop"
    assert s.text == expected and s.text.endswith(stop)
    assert s.token_count == next(i for i, p in enumerate(pieces) if stop in p)


def test_eos_ends_a_sample_without_adding_text(lm):
    prompt = short_prompt(lm)
    gen, _ = hf_greedy(lm, prompt, 4)
    lm.eos_ids = {gen[2]}  # pretend the third greedy token is the end of turn
    [[s]] = lm.generate([prompt], 1, stop=[], temperature=0, max_new_tokens=16)
    assert s.finish_reason == "eos" and s.token_count == 3
    assert s.text == lm.tokenizer.decode(gen[:2], skip_special_tokens=True)


def test_seeded_sampling_is_reproducible_and_samples_differ(lm, head_model_dir):
    prompt = short_prompt(lm)
    a = lm.generate([prompt], 4, stop=[], temperature=1.0, top_p=0.9, max_new_tokens=6, seed=7)
    b = LocalLM(head_model_dir, dtype="fp32").generate([prompt], 4, stop=[], temperature=1.0, top_p=0.9,
                                                       max_new_tokens=6, seed=7)
    c = lm.generate([prompt], 4, stop=[], temperature=1.0, top_p=0.9, max_new_tokens=6, seed=8)
    assert same(a, b)  # also across a warm and a cold prefix cache
    assert not same(a, c)
    assert len({s.text for s in a[0]}) == 4
    assert all(s.finish_reason == "length" and s.token_count == 6 for s in a[0])


def test_left_padded_batch_of_two_prompts_equals_separate_calls(head_model_dir):
    batched = LocalLM(head_model_dir, dtype="fp32")
    p1, p2 = short_prompt(batched), render_prompt(QUESTION, batched.tokenizer)
    assert len(batched.encode(p1)) != len(batched.encode(p2))
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=3)):
        together = batched.generate([p1, p2, p1], 2, stop=list(STOP), max_new_tokens=10, **kw)
        alone1 = LocalLM(head_model_dir, dtype="fp32").generate([p1], 2, stop=list(STOP), max_new_tokens=10, **kw)
        alone2 = LocalLM(head_model_dir, dtype="fp32").generate([p2], 2, stop=list(STOP), max_new_tokens=10, **kw)
        expected = [alone1[0], alone2[0], alone1[0]]
        if kw["temperature"] == 0:
            assert same(together, expected)
        else:
            # Other batch shapes move logits by ~1e-6 (GEMM blocking), and an inverse-CDF draw over
            # 49k tokens lands on a moved boundary about once per 1000 tokens: a rare sample may
            # legitimately diverge. Broken padding or seeding changes nearly all of them.
            pairs = [(s, t) for x, y in zip(together, expected) for s, t in zip(x, y)]
            assert sum(same([[s]], [[t]]) for s, t in pairs) >= len(pairs) - 1


def test_per_prompt_seeds_in_one_batch_equal_separate_calls(lm, head_model_dir):
    prompt = short_prompt(lm)
    kw = dict(stop=[], temperature=1.0, max_new_tokens=6)
    together = lm.generate([prompt, prompt], 3, seed=[7, 8], **kw)
    alone = [LocalLM(head_model_dir, dtype="fp32").generate([prompt], 3, seed=s, **kw)[0] for s in (7, 8)]
    assert same(together, alone) and not same([together[0]], [together[1]])
    with pytest.raises(ValueError, match="seeds for"):
        lm.generate([prompt], 2, seed=[1, 2], **kw)


def test_bad_arguments_are_clear_errors(lm):
    with pytest.raises(ValueError, match="n must be"):
        lm.generate(["x"], 0, stop=[], temperature=1.0)
    with pytest.raises(ValueError, match="top_p"):
        lm.generate(["x"], 1, stop=[], temperature=1.0, top_p=0)
    with pytest.raises(ValueError, match="empty prompt"):
        lm.generate([""], 1, stop=[], temperature=1.0)
    with pytest.raises(ValueError, match="empty state"):
        lm.score([""])
    assert lm.generate([], 2, stop=[], temperature=1.0) == [] and lm.score([]) == []


def test_concurrent_callers_get_the_same_answers_as_serial_ones(lm, head_model_dir):
    states = [short_prompt(lm, f"What is {i} + {i}?") for i in range(4)]
    serial = LocalLM(head_model_dir, dtype="fp32").score(states)
    results = [None] * 4

    def work(i):
        results[i] = lm.score([states[i]])[0]
        lm.generate([states[i]], 2, stop=[], temperature=1.0, max_new_tokens=3, seed=i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == pytest.approx(serial, abs=1e-5)


def test_small_cache_budget_still_gives_right_values(head_model_dir):
    small = LocalLM(head_model_dir, dtype="fp32", max_cached_tokens=40)
    states = [short_prompt(small, f"What is {i} times 7?") for i in range(3)]
    values = small.score(states)
    assert small.cache.tokens <= 40
    assert values == pytest.approx([full_value(small, s) for s in states], abs=1e-5)


def test_a_small_prefill_budget_splits_the_forwards_and_gives_the_same_values(head_model_dir, monkeypatch):
    """Beyond max_prefill_bytes the prompts are prefilled in more, smaller forwards (the work waits
    its turn, memory stays bounded) and the values do not change."""
    from alphamath.lm import local_lm
    big = LocalLM(head_model_dir, dtype="fp32")
    states = [short_prompt(big, f"What is {i} times 7?") for i in range(6)]
    expected = big.score(states)
    forwards = []
    small = LocalLM(head_model_dir, dtype="fp32", max_prefill_bytes=1)  # every row alone
    real = local_lm.LocalLM._extend_batch
    monkeypatch.setattr(local_lm.LocalLM, "_extend_batch", lambda self, rows: (forwards.append(len(rows)), real(self, rows)))
    assert small.score(states) == pytest.approx(expected, abs=1e-5)
    assert forwards == [1] * 6
    forwards.clear()
    roomy = LocalLM(head_model_dir, dtype="fp32")
    assert roomy.score(states) == pytest.approx(expected, abs=1e-5) and forwards == [6]


def test_a_long_row_is_not_padded_into_short_rows_forward_and_values_do_not_change(head_model_dir, monkeypatch):
    """_extend: rows whose new tokens differ by much go to separate forwards (a padded forward computes
    rows x the longest row's tokens); rows of similar length share one; the values are those of
    scoring each state alone."""
    from alphamath.lm import local_lm
    lm = LocalLM(head_model_dir, dtype="fp32")
    long = short_prompt(lm, "Explain, step by step and in great detail, " + "why seven times six is forty-two; " * 20)
    shorts = [short_prompt(lm, f"What is {i} times 7?") for i in range(4)]
    n_long, n_short = len(lm.encode(long)), max(len(lm.encode(s)) for s in shorts)
    assert 5 * n_long > local_lm.PAD_WASTE * (4 * n_short + n_long) + local_lm.PAD_SLACK  # joined, it would pad
    alone = [LocalLM(head_model_dir, dtype="fp32").score([s])[0] for s in shorts + [long]]
    forwards = []
    real = local_lm.LocalLM._extend_batch
    monkeypatch.setattr(local_lm.LocalLM, "_extend_batch", lambda self, rows: (forwards.append(len(rows)), real(self, rows)))
    assert lm.score([long] + shorts) == pytest.approx([alone[-1]] + alone[:-1], abs=1e-5)
    assert forwards == [4, 1]  # the four short states together (sorted by new tokens), the long one alone


def test_memory_budget_from_the_environment(monkeypatch):
    from alphamath.lm.budget import DEFAULT_MEMORY_MB, MemoryBudget, prefill_bytes
    monkeypatch.delenv("ALPHAMATH_MEMORY_MB", raising=False)
    assert MemoryBudget.from_env().total_bytes == DEFAULT_MEMORY_MB << 20
    monkeypatch.setenv("ALPHAMATH_MEMORY_MB", "1000")
    b = MemoryBudget.from_env()
    assert b.total_bytes == 1000 << 20
    assert b.cached_tokens(1000) == int((1000 << 20) * 0.25) // 1000
    assert b.batch_kv_bytes == int((1000 << 20) * 0.40) // 2  # joining copies the batch once
    assert b.prefill_bytes == int((1000 << 20) * 0.35)
    # 2 rows padded to 3 past + 2 new: KV twice, fp32 scores and probabilities, fp32 MLP activations
    assert prefill_bytes(2, 3, 2, kv_bytes_per_token=10, heads=4, hidden=8, intermediate=16) == (
        2 * 2 * 5 * 10 + 2 * 2 * 4 * 2 * 5 * 4 + 2 * 2 * (3 * 16 + 4 * 8) * 4)
    for bad in ("lots", "100"):
        monkeypatch.setenv("ALPHAMATH_MEMORY_MB", bad)
        with pytest.raises(ValueError, match="ALPHAMATH_MEMORY_MB"):
            MemoryBudget.from_env()


def test_lm_takes_its_limits_from_the_budget(head_model_dir, monkeypatch):
    from alphamath.lm.budget import configure_allocator
    monkeypatch.setenv("ALPHAMATH_MEMORY_MB", "512")
    lm = LocalLM(head_model_dir, dtype="fp32")
    assert lm.cache.max_tokens == lm.budget.cached_tokens(lm._kv_bytes_per_slot)
    assert lm.max_batch_kv_bytes == lm.budget.batch_kv_bytes and lm.max_prefill_bytes == lm.budget.prefill_bytes
    assert configure_allocator() is True  # glibc: freed tensors go back to the OS


# ---- Policy / Value adapters and the naive baseline ---------------------------------------------
def test_local_policy_and_value_share_one_lm(lm):
    policy, value = LocalPolicy(lm), LocalValue(lm)
    prompt = policy.render_prompt(QUESTION)
    assert prompt == render_prompt(QUESTION, lm.tokenizer) and "<|im_start|>assistant" in prompt
    [[s]] = policy.generate([prompt], 1, stop=STOP, temperature=0, max_new_tokens=5)
    assert isinstance(s, Sample)
    [v] = value.score([prompt + s.text])
    assert -1 <= v <= 1 and policy.usage is value.usage is lm.usage


def test_naive_baseline_agrees_with_local_and_computes_more(head_model_dir):
    lm = LocalLM(head_model_dir, dtype="fp32")
    naive_p, naive_v = NaivePolicy(lm.model, lm.tokenizer), NaiveValue(lm)
    prompt = render_prompt(QUESTION, lm.tokenizer)
    fast = lm.generate([prompt], 3, stop=list(STOP), temperature=0, max_new_tokens=8)
    slow = naive_p.generate([prompt], 3, stop=list(STOP), temperature=0, max_new_tokens=8)
    assert [s.text for s in fast[0]] == [s.text for s in slow[0]]
    assert [s.finish_reason for s in fast[0]] == [s.finish_reason for s in slow[0]]
    assert slow[0][0].cumulative_logprob == pytest.approx(fast[0][0].cumulative_logprob, abs=1e-3)
    plen = len(lm.encode(prompt))
    assert naive_p.usage.prefill_tokens == 3 * plen
    assert naive_p.usage.decode_tokens == 3 * (slow[0][0].token_count - 1)
    assert lm.usage.computed < naive_p.usage.computed
    states = [prompt + s.text for s in fast[0][:1]] + [prompt + "Add them.</step>\n"]
    assert naive_v.score(states) == pytest.approx(lm.score(states), abs=1e-5)
    assert naive_v.usage.prefill_tokens == sum(len(lm.encode(s)) for s in states)


# ---- the real model --------------------------------------------------------------------------------
@pytest.mark.slow
def test_embedded_smollm2_writes_a_step():
    from alphamath.model import embedded_checkpoint

    path = embedded_checkpoint()
    assert embedded_checkpoint() == path  # materialised once
    lm = LocalLM(path)
    prompt = LocalPolicy(lm).render_prompt("What is 15 + 27?")
    samples = lm.generate([prompt], 2, stop=list(STOP), temperature=0.7, max_new_tokens=48, seed=0)[0]
    assert lm.usage.prefill_tokens == len(lm.encode(prompt))
    for s in samples:
        assert s.token_count > 0 and s.cumulative_logprob < 0 and s.text.strip()
        assert s.finish_reason in ("stop", "eos", "length")
        if s.finish_reason == "stop":
            assert s.text.endswith(STOP)
    [v] = lm.score([prompt + samples[0].text])
    assert v == 0.0  # the embedded checkpoint has no trained head: a fresh head is neutral


def test_rows_finishing_at_different_steps_keep_exact_kv_and_logprobs(lm):
    """Early finishers leave the batch (their columns are compacted away); every sample must still
    match an uncached teacher-forced forward, and its stored KV/values must be the uncached ones."""
    prompts = [short_prompt(lm), render_prompt(QUESTION, lm.tokenizer)]
    lm.eos_ids = set(range(0, len(lm.tokenizer), 3))  # ~1/3 of the vocabulary ends a sample
    captured = []
    admit = lm._admit

    def spy(batch, reqs):
        out = admit(batch, reqs)
        captured.extend((smp.prompt.tokens, smp) for r in reqs for smp in r.samples)
        return out

    lm._admit = spy
    out = lm.generate(prompts, 4, stop=[], temperature=1.0, max_new_tokens=8, seed=5)
    lengths = {s.token_count for ss in out for s in ss}
    assert len(lengths) > 2  # rows really finished at different steps
    assert len(captured) == 8
    for prompt_ids, s in captured:
        ids = prompt_ids + s.tokens
        with torch.no_grad():
            ref = lm.model(torch.tensor([ids]))
        logp = torch.log_softmax(ref.logits[0, len(prompt_ids) - 1:-1].float(), -1)
        want = float(logp[torch.arange(len(s.tokens)), torch.tensor(s.tokens)].sum())
        assert s.logprob == pytest.approx(want, abs=1e-4)
        fed = ids[:-1]
        m, kv, values = lm.cache.match(fed)
        assert m == len(fed)
        torch.testing.assert_close(values, ref.values[0, :-1], atol=1e-5, rtol=1e-4)
        with torch.no_grad():
            _, cache = lm.model.hidden(torch.tensor([fed]), use_cache=True)
        torch.testing.assert_close(kv[0][0], cache.layers[0].keys[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(kv[-1][1], cache.layers[-1].values[0], atol=1e-5, rtol=1e-4)


def test_sampler_draws_from_the_tempered_top_p_distribution():
    """_pick's inverse-CDF sampler: frequencies match softmax(logits / T), top-p never picks a dropped
    token, each row depends only on its own generator, and the logprob is the raw model's."""
    from alphamath.lm.kv import _Decoding

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2, 1)
    def rows(seed):
        return [_Decoding(0, k, torch.Generator().manual_seed(seed * 10 + k)) for k in range(2)]
    draws = [LocalLM._pick(logits, rows(i), 1.0, 1.0)[0] for i in range(3000)]
    freq = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    hot = torch.softmax(logits[0] / 0.5, -1)
    draws = [LocalLM._pick(logits, rows(i), 0.5, 1.0)[0][0] for i in range(3000)]
    freq = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, hot, atol=0.03, rtol=0)
    picked = {LocalLM._pick(logits, rows(i), 1.0, 0.7)[0][0] for i in range(500)}
    assert picked == {0, 1}  # 0.5 + 0.3 reaches top_p = 0.7: tokens 2 and 3 are dropped
    a, lp = LocalLM._pick(logits, rows(7), 1.0, 1.0)
    b, _ = LocalLM._pick(logits[:1], rows(7)[:1], 1.0, 1.0)
    assert a[0] == b[0]  # row 0 does not depend on row 1
    assert lp[0] == pytest.approx(float(torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])[a[0]])), abs=1e-5)
    assert LocalLM._pick(logits, rows(1), 0, 1.0)[0] == [0, 0]


def test_a_call_joins_the_running_batch_with_exact_kv_and_logprobs(lm, monkeypatch):
    """Continuous batching: a generate() arriving while another decodes joins that batch at a step
    boundary, widening it on the left for its longer prompt. Every sample of both calls must match an
    uncached teacher-forced forward of its own prompt and tokens, and the KV stored for it must too."""
    prompts = [short_prompt(lm), render_prompt(QUESTION, lm.tokenizer)]
    assert len(lm.encode(prompts[1])) > len(lm.encode(prompts[0]))
    args = dict(stop=[], temperature=1.0, max_new_tokens=40)
    lm.eos_ids = set()  # run every sample to max_new_tokens, so the first call is still decoding
    started, joined, captured = threading.Event(), [], []
    admit = lm._admit

    def spy(batch, reqs):
        joined.append(batch is not None)
        out = admit(batch, reqs)
        captured.extend(smp for r in reqs for smp in r.samples)
        started.set()
        return out

    lm._admit = spy
    step = _Batch.step

    def gated(batch, lm_):  # the first call's first step waits until the second call is queued
        deadline = time.monotonic() + 10
        while not joined[1:] and not lm_._queue and time.monotonic() < deadline:
            time.sleep(0.001)
        return step(batch, lm_)

    monkeypatch.setattr(_Batch, "step", gated)
    got = {}
    first = threading.Thread(target=lambda: got.update(a=lm.generate([prompts[0]], 3, seed=1, **args)))
    first.start()
    started.wait(10)
    got["b"] = lm.generate([prompts[1]], 3, seed=2, **args)
    first.join()
    assert joined == [False, True]  # the second call was admitted into the running batch
    assert all(s.finish_reason == "length" and s.token_count == 40 for ss in got["a"] + got["b"] for s in ss)
    assert sorted(s.cumulative_logprob for ss in got["a"] + got["b"] for s in ss) == \
        sorted(smp.logprob for smp in captured)
    for smp in captured:
        ids = smp.prompt.tokens + smp.tokens
        with torch.no_grad():
            ref = lm.model(torch.tensor([ids]))
        logp = torch.log_softmax(ref.logits[0, len(smp.prompt.tokens) - 1:-1].float(), -1)
        want = float(logp[torch.arange(len(smp.tokens)), torch.tensor(smp.tokens)].sum())
        assert smp.logprob == pytest.approx(want, abs=1e-3)
        m, kv, values = lm.cache.match(ids[:-1])
        assert m == len(ids) - 1
        torch.testing.assert_close(values, ref.values[0, :-1], atol=1e-5, rtol=1e-4)


def test_a_waiting_call_with_other_settings_is_not_starved(lm):
    """While a call with other sampling settings waits, the running batch admits no more calls of its
    own kind: it drains, and the waiting call starts next."""
    prompt = short_prompt(lm)
    lm.eos_ids = set()
    started, order = threading.Event(), []
    admit = lm._admit

    def spy(batch, reqs):
        order.extend((batch is not None, r.key[1]) for r in reqs)
        out = admit(batch, reqs)
        started.set()
        return out

    lm._admit = spy
    first = threading.Thread(target=lambda: lm.generate([prompt], 2, temperature=1.0, max_new_tokens=300, seed=1))
    first.start()
    started.wait(10)
    # while the first call decodes, queue a greedy call, then another sampled one
    greedy = threading.Thread(target=lambda: lm.generate([prompt], 1, temperature=0, max_new_tokens=5))
    sampled = threading.Thread(target=lambda: lm.generate([prompt + " 1"], 2, temperature=1.0,
                                                          max_new_tokens=60, seed=2))
    greedy.start()
    deadline = time.monotonic() + 10
    while not lm._queue and time.monotonic() < deadline:
        time.sleep(0.001)
    sampled.start()
    for t in (first, greedy, sampled):
        t.join(60)
    assert order[0] == (False, 1.0)
    assert (False, 0.0) in order  # the greedy call started a batch of its own ...
    assert order.index((False, 0.0)) < [k for _, k in order].index(1.0, 1)  # ... before the second sampled call
    assert (True, 1.0) not in order  # which did not join the first call's batch


def test_the_decode_loop_runs_on_the_calling_thread(lm, monkeypatch):
    """No decode thread of its own (a second OpenMP pool made every step ~1.6x slower): the caller
    steps the batch, and nothing keeps running after the call returns."""
    threads, step = set(), _Batch.step

    def spy(batch, lm_):
        threads.add(threading.get_ident())
        return step(batch, lm_)

    monkeypatch.setattr(_Batch, "step", spy)
    before = threading.active_count()
    out = lm.generate([short_prompt(lm)], 2, temperature=1.0, max_new_tokens=5, seed=3)
    assert len(out[0]) == 2 and threads == {threading.get_ident()}
    assert threading.active_count() == before and lm._batch is None and not lm._leading


def test_rows_of_a_prefill_that_share_an_uncached_prefix_compute_it_once(head_model_dir):
    """Cold, a prefill whose rows share SHARED_MIN or more uncached tokens (two prompts opening with the same
    few-shot text; a question's first children) computes that prefix once, then each row's rest after it: the
    prefill counts the shared tokens once, the values are those of each state scored alone, and a row that is
    the prefix itself still computes its last token where it needs logits."""
    from alphamath.lm.local_lm import SHARED_MIN

    shared = "You are a careful tutor: solve each problem step by step, and check every step twice. " * 4
    states = [shared + "Question: what is 7 * 6 minus 5?", shared + "Question: what is 2 + 3, doubled?"]
    lm = LocalLM(head_model_dir, dtype="fp32")
    common = len(os.path.commonprefix([lm.encode(s) for s in states]))
    assert common >= SHARED_MIN
    values = lm.score(states)
    assert lm.usage.prefill_tokens == sum(len(lm.encode(s)) for s in states) - common
    alone = []
    for s in states:
        one = LocalLM(head_model_dir, dtype="fp32")
        alone += one.score([s])
        assert one.usage.prefill_tokens == len(one.encode(s))
    assert values == pytest.approx(alone, abs=1e-5)
    lm = LocalLM(head_model_dir, dtype="fp32")  # features need the last token computed, the prefix row too
    prefix = lm.tokenizer.decode(lm.encode(states[0])[:common])
    feats = lm.features([prefix, states[0]])
    assert feats.shape[0] == 2 and lm.usage.prefill_tokens == len(lm.encode(states[0])) + 1  # its last, again
    want = torch.cat([LocalLM(head_model_dir, dtype="fp32").features([t]) for t in (prefix, states[0])])
    torch.testing.assert_close(feats, want, atol=1e-4, rtol=1e-4)


def test_the_model_lock_is_granted_in_arrival_order():
    """A thread that re-takes the lock in a tight loop (the decode loop) cannot starve another."""
    lock, stop, got = _FairLock(), threading.Event(), threading.Event()

    def loop():
        while not stop.is_set():
            with lock:
                with lock:  # re-entrant
                    time.sleep(0.002)

    def other():
        with lock:
            got.set()

    looping = threading.Thread(target=loop)
    looping.start()
    time.sleep(0.02)
    waiting = threading.Thread(target=other)
    waiting.start()
    took = got.wait(2.0)  # one turn of the loop; a plain lock can starve it indefinitely
    stop.set()
    looping.join()
    waiting.join()
    assert took


def test_the_compute_lock_keeps_other_processes_out_while_held_and_is_a_no_op_without_a_file(tmp_path, monkeypatch):
    """ALPHAMATH_COMPUTE_LOCK (the local stack sets it for its policy and value services): model compute holds an
    flock on that file, which another open file (another process) cannot take until the outermost exit; unset,
    the lock touches nothing."""
    import fcntl

    from alphamath.lm.lock import _ComputeLock

    path = tmp_path / "compute.lock"
    lock = _ComputeLock()
    monkeypatch.setenv("ALPHAMATH_COMPUTE_LOCK", str(path))
    other = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        with lock:
            with lock:  # re-entrant
                pass
            with pytest.raises(BlockingIOError):  # still held after the inner exit
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the outer exit
        fcntl.flock(other, fcntl.LOCK_UN)
        monkeypatch.delenv("ALPHAMATH_COMPUTE_LOCK")
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with lock:  # no file: nothing is locked
            pass
        fcntl.flock(other, fcntl.LOCK_UN)
    finally:
        os.close(other)


def test_decode_steps_and_scoring_compute_under_the_compute_lock(lm, monkeypatch):
    """Every forward LocalLM runs (a decode step with its admission's prefill, a score's prefill) holds COMPUTE,
    so two model services sharing the CPUs take turns at them (lm/lock.py)."""
    from alphamath.lm import local_lm, scheduler

    held = []

    class Recorder:
        depth = 0

        def __enter__(self):
            Recorder.depth += 1

        def __exit__(self, *exc):
            Recorder.depth -= 1

    monkeypatch.setattr(scheduler, "COMPUTE", Recorder())
    monkeypatch.setattr(local_lm, "COMPUTE", Recorder())
    extend, step = lm._extend, _Batch.step
    monkeypatch.setattr(lm, "_extend", lambda rows: (held.append(("prefill", Recorder.depth)), extend(rows))[1])
    monkeypatch.setattr(_Batch, "step", lambda self, m: (held.append(("step", Recorder.depth)), step(self, m))[1])
    lm.generate(["Question: 2 + 3?"], 2, temperature=1.0, max_new_tokens=6, seed=1)
    lm.score(["Question: 2 + 3? Step: 5."])
    assert {what for what, _ in held} == {"prefill", "step"} and all(depth == 1 for _, depth in held)


def generate_from_workers_while_serving(lm, prompts):
    """One generate() per prompt (seed = its index) from worker threads, started once this thread
    runs `lm.serve`, which returns when all are answered."""
    got = [None] * len(prompts)

    def call(i):
        deadline = time.monotonic() + 10
        while not lm._leading and time.monotonic() < deadline:  # call once the main thread serves
            time.sleep(0.001)
        got[i] = lm.generate([prompts[i]], 2, temperature=1.0, max_new_tokens=12, seed=i)

    workers = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for w in workers:
        w.start()
    lm.serve(lambda: all(g is not None for g in got))
    for w in workers:
        w.join(10)
    return got


def test_serve_runs_other_threads_calls_on_the_serving_thread(lm, monkeypatch):
    """`serve` on the main thread decodes for generate() calls made on worker threads (one OpenMP
    pool), with the same samples as when each call leads itself, and returns when told to."""
    prompts = [short_prompt(lm, f"What is {i} + 3?") for i in range(3)]
    want = [lm.generate([p], 2, temperature=1.0, max_new_tokens=12, seed=i) for i, p in enumerate(prompts)]
    threads, step = set(), _Batch.step

    def spy(batch, lm_):
        threads.add(threading.get_ident())
        return step(batch, lm_)

    monkeypatch.setattr(_Batch, "step", spy)
    lm.reset_cache()
    got = generate_from_workers_while_serving(lm, prompts)
    assert threads == {threading.get_ident()}
    assert [[s.text for s in g[0]] for g in got] == [[s.text for s in w[0]] for w in want]
    assert not lm._leading and lm._batch is None


def test_other_threads_score_and_features_run_on_the_serving_thread(lm, head_model_dir, monkeypatch):
    """While a thread serves, score() and features() called on other threads, for this LocalLM or another
    one in the process (the policy and value of a two-model layout), run on the serving thread between its
    steps, with the values they have inline; an error reaches its caller, and serving goes on."""
    other = LocalLM(head_model_dir, dtype="fp32")
    states = [short_prompt(lm, f"What is {i} + 4?") + " Step 1" for i in range(3)]
    want_values, want_features = other.score(states), other.features(states)
    other.reset_cache()
    threads, score = [], LocalLM._score

    def spy(self, s):
        threads.append(threading.get_ident())
        return score(self, s)

    monkeypatch.setattr(LocalLM, "_score", spy)
    got, done = {}, threading.Event()

    def call():
        while not lm._leading:  # once the main thread serves
            time.sleep(0.001)
        got["generate"] = lm.generate([states[0]], 2, temperature=1.0, max_new_tokens=12, seed=1)
        got["values"], got["own"] = other.score(states), lm.score(states[:1])
        got["features"] = other.features(states)
        with pytest.raises(ValueError, match="empty state"):
            lm.score([""])
        done.set()

    worker = threading.Thread(target=call)
    worker.start()
    lm.serve(done.is_set)
    worker.join(10)
    assert done.is_set() and threads == [threading.get_ident()] * 3
    assert got["values"] == pytest.approx(want_values, abs=1e-5)
    assert torch.allclose(got["features"], want_features, atol=1e-5)
    assert not lm._leading


def test_one_thread_serves_decode_loops_in_a_process(lm, head_model_dir):
    """A second serve() while one runs is a clear error, not a second OpenMP pool; inline calls work after."""
    other, started, errors = LocalLM(head_model_dir, dtype="fp32"), threading.Event(), []

    def second():
        started.wait(10)
        try:
            other.serve(lambda: True)
        except RuntimeError as e:
            errors.append(e)

    t = threading.Thread(target=second)
    t.start()

    def until():  # while this thread serves, the other tries to
        started.set()
        t.join(10)
        return True

    lm.serve(until)
    assert errors and "already serves" in str(errors[0]) and not other._leading
    assert len(other.score([short_prompt(lm)])) == 1  # no one serves: computed on this thread


def test_requests_join_the_batch_only_within_its_kv_budget(head_model_dir, monkeypatch):
    """Rows are padded to the widest prompt, so the batch's KV is bounded in bytes, not just rows: a
    request that would push it past the budget waits for the batch to shrink, and loses nothing."""
    probe = LocalLM(head_model_dir, dtype="fp32")
    prompts = [short_prompt(probe, f"What is {i} + 3?") for i in range(3)]
    want = [probe.generate([p], 2, temperature=1.0, max_new_tokens=12, seed=i) for i, p in enumerate(prompts)]
    width = max(len(probe.encode(p)) for p in prompts)
    lm = LocalLM(head_model_dir, dtype="fp32", max_batch_kv_bytes=2 * (width + 12) * probe._kv_bytes_per_slot)
    sizes, step = [], _Batch.step

    def spy(batch, lm_):
        sizes.append(batch.size)
        return step(batch, lm_)

    monkeypatch.setattr(_Batch, "step", spy)
    got = generate_from_workers_while_serving(lm, prompts)
    assert sizes and max(sizes) == 2  # one request (2 rows) at a time
    assert [[s.text for s in g[0]] for g in got] == [[s.text for s in w[0]] for w in want]


def _stored_kv_matches_an_uncached_forward(lm, smp):
    ids = smp.prompt.tokens + smp.tokens
    with torch.no_grad():
        ref = lm.model(torch.tensor([ids]))
    logp = torch.log_softmax(ref.logits[0, len(smp.prompt.tokens) - 1:-1].float(), -1)
    assert smp.logprob == pytest.approx(float(logp[torch.arange(len(smp.tokens)), torch.tensor(smp.tokens)].sum()), abs=1e-4)
    m, kv, values = lm.cache.match(ids[:-1])
    assert m == len(ids) - 1
    torch.testing.assert_close(values, ref.values[0, :-1], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        _, cache = lm.model.hidden(torch.tensor([ids[:-1]]), use_cache=True)
    torch.testing.assert_close(kv[0][0], cache.layers[0].keys[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(kv[-1][1], cache.layers[-1].values[0], atol=1e-5, rtol=1e-4)


def test_the_samples_of_a_prompt_hold_its_kv_once(lm, monkeypatch):
    """n samples each of 2 prompts: the batch holds 2 prompts' KV, and each row only the columns it fed."""
    seen, step = [], _Batch.step

    def spy(batch, lm_):
        seen.append((batch.shared.keys[0].shape[0], batch.prompt_len, batch.size, batch.layers[0].keys.shape[2]))
        return step(batch, lm_)

    monkeypatch.setattr(_Batch, "step", spy)
    prompts = [short_prompt(lm), render_prompt(QUESTION, lm.tokenizer)]
    lm.eos_ids = set()
    lm.generate(prompts, 5, stop=[], temperature=1.0, max_new_tokens=6, seed=3)
    assert seen[0] == (2, max(len(lm.encode(p)) for p in prompts), 10, 0)
    assert [s[3] for s in seen] == [0, 1, 2, 3, 4, 5]  # own columns: one per fed token


def test_a_finished_row_whose_prompt_left_the_cache_stores_it_whole(lm):
    """A row's prompt normally stays in the prefix cache from admission on, so a finished row stores only
    its own columns; if the prompt was evicted meanwhile, the row stores prompt and own columns."""
    captured, admit = [], lm._admit

    def evicting(batch, reqs):
        out = admit(batch, reqs)
        captured.extend(smp for r in reqs for smp in r.samples)
        lm.cache.clear()
        return out

    lm._admit = evicting
    lm.eos_ids = set()
    lm.generate([render_prompt(QUESTION, lm.tokenizer)], 2, stop=[], temperature=1.0, max_new_tokens=6, seed=9)
    assert len(captured) == 2
    for smp in captured:
        _stored_kv_matches_an_uncached_forward(lm, smp)


def test_architectures_without_the_fast_forward_decode_the_same_samples(head_model_dir):
    """LocalLM runs transformers' forward for models FastLlama does not cover; its decode steps join
    each row's shared prompt and own columns, and must give what the fast forward gives."""
    fast, slow = LocalLM(head_model_dir, dtype="fp32"), LocalLM(head_model_dir, dtype="fp32")
    slow._fast = None
    prompts = [short_prompt(fast), render_prompt(QUESTION, fast.tokenizer)]
    for m in (fast, slow):
        m.eos_ids = set(range(0, len(m.tokenizer), 5))  # rows finish at different steps
    args = dict(stop=[], temperature=1.0, max_new_tokens=10, seed=4)
    got = slow.generate(prompts, 3, **args)
    assert len({s.token_count for ss in got for s in ss}) > 1
    assert same(got, fast.generate(prompts, 3, **args))
    captured, admit = [], slow._admit
    slow._admit = lambda batch, reqs: (admit(batch, reqs), captured.extend(smp for r in reqs for smp in r.samples))[0]
    slow.generate(prompts[1:], 2, **{**args, "seed": 5})
    assert len(captured) == 2
    for smp in captured:
        _stored_kv_matches_an_uncached_forward(slow, smp)


def _slab_row(n: int, seed: int):
    """A prompt row of n tokens with random bf16 KV (2 layers, 3 KV heads, head size 64)."""
    from alphamath.lm.kv import _Row
    g = torch.Generator().manual_seed(seed)
    kv = [tuple(torch.randn(3, n, 64, generator=g).bfloat16() for _ in range(2)) for _ in range(2)]
    row = _Row(list(range(n)), n, None, None, kv=kv)
    row.last_logits = torch.zeros(11)
    return row


def _check_slab(batch, rows_of):
    """Every held prompt sits in its slot as its KV, zeros after, with prompt_tiles of exactly that, and
    each row's group is the slot of the prompt it continues."""
    from alphamath.model import decode
    for g, p in enumerate(batch.prompts):
        if p is None:
            continue
        n = len(p.tokens)
        for layer, (k, v) in enumerate(p.kv):
            assert torch.equal(batch.keys[layer][g, :, :n], k) and torch.equal(batch.values[layer][g, :, :n], v)
            assert not batch.keys[layer][g, :, n:].any() and not batch.values[layer][g, :, n:].any()
            if batch.tiles:
                kt, vt = batch.slab_tiles[layer]
                want = decode.prompt_tiles(batch.keys[layer][g:g + 1], batch.values[layer][g:g + 1])
                assert torch.equal(kt[g:g + 1], want[0]) and torch.equal(vt[g:g + 1], want[1])
                assert kt.shape[3] == batch.keys[layer].shape[2]
    assert [batch.prompts[g] for g in batch.group_of] == rows_of
    assert batch.shared.group.tolist() == batch.group_of
    held = batch.prompts[:len(batch.shared.lengths)]
    assert batch.shared.lengths.tolist() == [len(p.tokens) if p else 0 for p in held]


def test_the_prompt_slab_admits_in_place_frees_on_drop_and_reuses_freed_slots():
    """A batch's prompts live in a slab with room: an admission that fits writes only its new prompts
    (the slab is not reallocated), a prompt no row continues frees its slot, and a later, shorter prompt
    in that slot leaves none of the old one behind (its KV and tiles equal its own, zeros after). The
    tiles (decode.lay_tiles) are checked where the kernels run; the keys and values everywhere."""
    from alphamath.lm.kv import _Batch, _Decoding, _slab_size
    from alphamath.model import decode

    batch = _Batch((), 4, tiles=decode.kernel() is not None)
    a, b = _slab_row(70, 0), _slab_row(37, 1)
    first = [_Decoding(a, 0, None), _Decoding(a, 1, None), _Decoding(b, 0, None)]
    batch.add(first, 8, torch.device("cpu"))
    assert (len(batch.prompts), batch.keys[0].shape[2]) == _slab_size(2, 70) == (4, 96)
    _check_slab(batch, [a, a, b])
    slab = batch.keys[0].data_ptr(), batch.values[-1].data_ptr()
    c = _slab_row(50, 2)
    batch.add([_Decoding(c, 0, None)], 8, torch.device("cpu"))
    assert (batch.keys[0].data_ptr(), batch.values[-1].data_ptr()) == slab  # written in place
    _check_slab(batch, [a, a, b, c])
    batch._select([2, 3])  # a's rows are gone: its slot is freed, nothing is copied
    assert batch.prompts[0] is None and batch.keys[0].data_ptr() == slab[0]
    _check_slab(batch, [b, c])
    d = _slab_row(20, 3)  # reuses a's slot
    batch.add([_Decoding(d, 0, None)], 8, torch.device("cpu"))
    assert batch.prompts[0] is d and batch.keys[0].data_ptr() == slab[0]
    _check_slab(batch, [b, c, d])
    e, f = _slab_row(120, 4), _slab_row(5, 5)  # longer than the slab's columns: it grows, held prompts kept
    batch.add([_Decoding(e, 0, None), _Decoding(f, 0, None)], 8, torch.device("cpu"))
    assert batch.keys[0].shape[2] == _slab_size(5, 120)[1] and batch.keys[0].data_ptr() != slab[0]
    _check_slab(batch, [b, c, d, e, f])
    more = [_slab_row(30 + i, 10 + i) for i in range(6)]
    batch.add([_Decoding(r, 0, None) for r in more], 8, torch.device("cpu"))
    assert len(batch.prompts) == _slab_size(11, 120)[0] == 16
    _check_slab(batch, [b, c, d, e, f] + more)
    batch._select([3])  # one prompt of 11 left: a quarter of the slots or fewer are held, so it shrinks
    assert (len(batch.prompts), batch.keys[0].shape[2]) == _slab_size(1, 120)
    _check_slab(batch, [e])


def test_a_batch_holds_its_root_once_and_each_prompt_past_it_in_its_slot():
    """A decode batch's root (where decode.cpp computes attention): the prefix its prompts share is laid out
    once as prompt_tiles, a
    prompt that continues past it holds only the rest in its slot (lengths), with root_len naming the root;
    a prompt that is the root and no more, or starts otherwise, is held whole. A root under ROOT_MIN
    tokens is not held apart."""
    from alphamath.lm.kv import ROOT_MIN, _Batch, _Decoding, _Row
    from tests.test_model import decode_kernels_or_skip

    decode = decode_kernels_or_skip()  # a root is held only where decode.cpp computes decode attention
    g = torch.Generator().manual_seed(5)
    root = [tuple(torch.randn(3, 70, 64, generator=g).bfloat16() for _ in range(2)) for _ in range(2)]

    def row(tokens, rooted=True):
        extra = len(tokens) - 70 if rooted else len(tokens)
        kv = [tuple(torch.cat([r[:, :70 if rooted else 0], torch.randn(3, extra, 64, generator=g).bfloat16()], 1)
                    for r in layer) for layer in root]
        out = _Row(tokens, len(tokens), None, None, kv=kv)
        out.last_logits = torch.zeros(11)
        return out

    a, b = row(list(range(100))), row(list(range(70)) + [500] * 5)
    same, other = row(list(range(70))), row([1000 + i for i in range(50)], rooted=False)
    batch = _Batch((), 4, tiles=decode.tiles_on(), root=70)
    batch.add([_Decoding(p, k, None) for p, k in ((a, 0), (a, 1), (b, 0), (same, 0), (other, 0))], 8,
              torch.device("cpu"))
    assert batch.root == 70 and batch.root_tokens == list(range(70))
    for layer, (rk, rv) in enumerate(root):
        want = decode.prompt_tiles(rk[None], rv[None])
        kt, vt = batch.root_tiles[layer]
        assert torch.equal(kt, want[0][0]) and torch.equal(vt, want[1][0])
    starts = {id(a): 70, id(b): 70, id(same): 0, id(other): 0}
    for slot, p in enumerate(batch.prompts[:4]):
        start, n = starts[id(p)], len(p.tokens) - starts[id(p)]
        for layer, (k, v) in enumerate(p.kv):
            assert torch.equal(batch.keys[layer][slot, :, :n], k[:, start:])
            assert torch.equal(batch.values[layer][slot, :, :n], v[:, start:])
            assert not batch.keys[layer][slot, :, n:].any()
    assert batch.shared.lengths.tolist() == [30, 5, 70, 50]
    assert batch.shared.root_len.tolist() == [70, 70, 0, 0] and batch.shared.root_tiles is batch.root_tiles
    assert _Batch((), 4, root=ROOT_MIN - 1).root == 0


def test_a_running_batch_that_began_without_a_root_takes_one_when_later_prompts_share_a_prefix():
    """A batch that began with one prompt, alone in the prefix cache, saw no branch and held it whole (16
    concurrent searches' prompts then each read their own copy of the 338-token few-shot prefix in every step).
    When prompts that share a prefix with it join, it takes that prefix as its root: the held prompt moves down
    its slot (its tiles too), the slab holds only what follows the root, and attention reads the same keys."""
    from alphamath.lm.kv import ROOT_MIN, _Batch, _Decoding, _Row
    from tests.test_model import decode_kernels_or_skip

    decode = decode_kernels_or_skip()
    g = torch.Generator().manual_seed(6)
    root = [tuple(torch.randn(3, 70, 64, generator=g).bfloat16() for _ in range(2)) for _ in range(2)]

    def row(tokens):
        kv = [tuple(torch.cat([r, torch.randn(3, len(tokens) - 70, 64, generator=g).bfloat16()], 1) for r in layer)
              for layer in root]
        out = _Row(tokens, len(tokens), None, None, kv=kv)
        out.last_logits = torch.zeros(11)
        return out

    a, b, c = row(list(range(100))), row(list(range(70)) + [500] * 5), row(list(range(70)) + [600] * 9)
    dev = torch.device("cpu")
    batch = _Batch((), 4, tiles=decode.tiles_on(), root=100)  # the cache's first branch was all of a
    batch.add([_Decoding(a, 0, None), _Decoding(a, 1, None)], 8, dev)
    assert batch.root_kv is None and batch.shared.lengths.tolist() == [100]
    q = torch.randn(3, 3, 1, 64, generator=g).bfloat16()
    own = torch.zeros(3, 3, 1, 64).bfloat16()

    def attend(rows):  # decode attention of query rows continuing slots `rows`, with nothing of their own
        sh = batch.shared
        tiles = sh.tiles[1] if sh.tiles else None
        root_args = (*sh.root_tiles[1], sh.root_len) if sh.root_len is not None else None
        return decode.decode_attention(q[:len(rows)], own[:len(rows)], own[:len(rows)],
                                       torch.zeros(len(rows), 1, dtype=torch.bool), sh.keys[1], sh.values[1],
                                       sh.lengths, torch.tensor(rows), 0.125, tiles, root=root_args)

    before = attend([0])
    batch.add([_Decoding(b, 0, None)], 8, dev, root=ROOT_MIN - 1)  # too short a shared prefix: none
    assert batch.root_kv is None
    batch.add([_Decoding(c, 0, None)], 8, dev, root=70)
    assert batch.root == 70 and batch.root_tokens == list(range(70))
    assert batch.shared.lengths.tolist() == [30, 5, 9] and batch.shared.root_len.tolist() == [70, 70, 70]
    for layer, (rk, rv) in enumerate(root):
        kt, vt = batch.root_tiles[layer]
        want = decode.prompt_tiles(rk[None], rv[None])
        assert torch.equal(kt, want[0][0]) and torch.equal(vt, want[1][0])
    for slot, (p, start) in enumerate(((a, 70), (b, 70), (c, 70))):
        n = len(p.tokens) - start
        for layer, (k, v) in enumerate(p.kv):
            assert torch.equal(batch.keys[layer][slot, :, :n], k[:, start:])
            assert torch.equal(batch.values[layer][slot, :, :n], v[:, start:])
            assert not batch.keys[layer][slot, :, n:].any() and not batch.values[layer][slot, :, n:].any()
            if batch.slab_tiles is not None:
                kt, vt = decode.prompt_tiles(k[None, :, start:], v[None, :, start:])
                L = kt.shape[3]
                assert torch.equal(batch.slab_tiles[layer][0][slot, :, :, :L], kt[0])
    torch.testing.assert_close(attend([0]).float(), before.float(), atol=2e-2, rtol=2e-2)


def test_attention_over_a_slab_with_a_freed_slot_equals_each_rows_own_attention():
    """After a drop frees a slot below a held one, decode attention over the slab (the torch path, and
    decode.cpp's where it runs, with the AMX tiles where they are on) must still equal, for every row,
    softmax attention over its own prompt's K/V followed by its own columns."""
    from alphamath.lm.kv import _Batch, _Decoding
    from alphamath.model import decode
    from alphamath.model.attention import shared_prompt_attention

    tiles = decode.kernel() is not None and decode.tiles_on()
    batch = _Batch((), 4, tiles=tiles)
    a, b, c = _slab_row(40, 20), _slab_row(65, 21), _slab_row(33, 22)
    batch.add([_Decoding(a, 0, None), _Decoding(b, 0, None), _Decoding(b, 1, None), _Decoding(c, 0, None)], 8,
              torch.device("cpu"))
    batch._select([1, 2, 3])  # a's slot (0) is freed, b and c stay above it
    assert batch.prompts[0] is None and len(batch.shared.lengths) == 3
    g = torch.Generator().manual_seed(7)
    B, Hk, G, D, W = 3, 3, 3, 64, 2
    q = torch.randn(B, Hk, G, D, generator=g).bfloat16()
    own_k, own_v = (torch.randn(B, Hk, W, D, generator=g).bfloat16() for _ in range(2))
    want = []
    for row in range(B):
        k0, v0 = batch.prompts[batch.group_of[row]].kv[1]
        k, v = torch.cat([k0, own_k[row]], 1).float(), torch.cat([v0, own_v[row]], 1).float()
        p = torch.softmax(q[row].float() @ k.transpose(1, 2) * 0.125, -1)
        want.append(p @ v)
    want = torch.stack(want)
    got = shared_prompt_attention(q, own_k, own_v, None, batch.shared, 1, 0.125)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    if decode.kernel() is not None:
        t = batch.shared.tiles[1] if batch.shared.tiles else None
        out = decode.decode_attention(q, own_k, own_v, None, batch.shared.keys[1], batch.shared.values[1],
                                      batch.shared.lengths, batch.shared.group, 0.125, t)
        torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


def test_lookup_drafts_what_followed_the_last_earlier_occurrence_of_the_final_ngram():
    from alphamath.lm.lookup import Lookup

    prompt = Lookup([5, 6, 7, 8, 9, 6, 7, 1, 2])
    assert prompt.draft(3, cut=None) == []  # the final bigram (1, 2) and token 2 never occurred before
    seq = prompt.fork([5, 6, 7, 8, 9, 6, 7, 1, 2])
    seq.tokens += [5, 6, 7]  # (5, 6, 7) occurred at the start: 8, 9, 6 followed it
    assert seq.draft(3, cut=None) == [8, 9, 6]
    seq.tokens += [3, 6, 7]  # (3, 6, 7) never; (6, 7) last at positions 10-11, followed by 3 (not 8 or 1)
    assert seq.draft(2, cut=None) == [3, 6]
    assert seq.draft(10, cut=None) == [3, 6, 7]  # a draft stops where the sequence ends
    assert prompt.tokens == [5, 6, 7, 8, 9, 6, 7, 1, 2] and prompt.draft(3, cut=None) == []  # the fork copied the index
    seq = Lookup([4, 4])
    assert seq.draft(3, cut=None) == [4]  # a token's previous occurrence, never the final n-gram itself


def test_lookup_drafts_as_many_tokens_as_its_match_reaches_back():
    """The engine's drafts are cut by how far back the match behind them reaches (lookup.draft_cut): a
    short match is a guess, a long one a copy in progress."""
    from alphamath.lm.lookup import DRAFT_MAX, Lookup, draft_cut, reach

    assert [draft_cut(m) for m in (0, 3, 4, 7, 8, 15, 16, 40)] == [0, 0, 1, 1, 2, 2, DRAFT_MAX, DRAFT_MAX]
    text = list(range(100, 130))  # 30 distinct tokens
    assert reach(text + text[:5], 35, 5) == 5 and reach(text + [1] + text[:5], 36, 5) == 5
    for m, want in ((3, 0), (4, 1), (9, 2), (20, 4)):
        seq = Lookup(text + [7] + text[:m])  # a copy of the text's first m tokens in progress
        assert seq.draft(DRAFT_MAX) == text[m:m + want], m
        assert seq.draft(DRAFT_MAX, cut=None) == text[m:m + DRAFT_MAX]
    assert Lookup(text + [7] + text[:20]).draft(1) == text[20:21]  # k still bounds it


def test_draft_length_weighs_the_yield_of_a_draft_against_the_rows_it_adds():
    from alphamath.lm.lookup import DRAFT_MAX, draft_length

    assert draft_length([4], 0.35, 0.03, 40) == DRAFT_MAX  # one row: four more rows cost 12%, yield 140%
    assert draft_length([4], 0.0, 0.03, 40) == 0  # nothing accepted: no row is worth adding
    assert draft_length([4] * 5, 0.1, 0.03, 40) == 0  # (5 + 0.5 k) / (1 + 0.03 (5k + 4)) peaks at k = 0 ...
    assert draft_length([4] * 5, 0.35, 0.03, 40) == DRAFT_MAX  # ... and at k = 4 when a third of drafts land
    assert draft_length([4] * 20, 0.35, 0.03, 40) == 0  # twenty drafting rows: a draft row costs more than it yields
    # A ragged step: rows without a draft add no query row, so two drafting rows among twenty still pay
    assert draft_length([4, 4] + [0] * 18, 0.75, 0.03, 40) == DRAFT_MAX
    assert draft_length([4] * 10, 0.45, 0.03, 25) == 1  # the step's row cap: 10 + 10 k <= 25
    assert draft_length([4] * 3, 0.35, 0.03, 3) == 0  # no room for any draft
    assert draft_length([1, 0, 2], 0.9, 0.03, 40) == 2  # k past the longest draft gains nothing: the smallest best k


def test_a_cache_layer_written_in_place_counts_its_columns_and_refuses_to_overrun():
    """decode.decode_layers writes a step's K/V into a _RoomyLayer's buffers; `advance` counts them
    and, like `update`, refuses columns past the room the batch reserved."""
    import torch

    from alphamath.lm.kv import _RoomyLayer

    layer = _RoomyLayer.empty(torch.zeros(1, 2, 3, 4), rows=2, width=3, room=2)
    k, v, n = layer.buffers()
    assert (k.shape, v.shape, n) == ((2, 2, 5, 4), (2, 2, 5, 4), 3)
    k[:, :, n:n + 2] = 1.0
    layer.advance(2)
    assert layer.keys.shape[2] == 5 and bool((layer.keys[:, :, 3:] == 1).all())
    with pytest.raises(RuntimeError, match="out of room"):
        layer.advance(1)


def test_a_cache_layer_keeps_one_slice_of_columns_as_it_keeps_them_row_by_row():
    """`gather` with one slice of columns for every kept row (a compaction with no holes, `_Batch._select`) picks the
    rows by index_select; it must keep what the row-by-row gather keeps, with the same room after it. Rows that each
    keep their own columns (a draft's holes squeezed out) get exactly those, in order."""
    import torch

    from alphamath.lm.kv import _RoomyLayer

    def layer():
        g = torch.Generator().manual_seed(1)
        keys, values = (torch.randn(5, 3, 9, 4, generator=g).to(torch.bfloat16) for _ in range(2))
        return _RoomyLayer(keys, values, 7)

    rows = torch.tensor([0, 2, 3])
    by_row, by_slice = layer(), layer()
    by_row.gather(rows, torch.arange(3, 7)[None].expand(3, 4), room=2)
    by_slice.gather(rows, slice(3, 7), room=2)
    assert by_slice.n == by_row.n == 4 and by_slice.buffers()[0].shape == by_row.buffers()[0].shape == (3, 3, 6, 4)
    assert torch.equal(by_slice.keys, by_row.keys) and torch.equal(by_slice.values, by_row.values)
    assert torch.equal(by_slice.keys, layer().keys[rows][:, :, 3:7])
    holes = torch.tensor([[0, 2, 5, 6], [1, 3, 4, 6], [2, 3, 5, 6]])  # each row its own columns, holes squeezed out
    by_row = layer()
    by_row.gather(rows, holes, room=1)
    want = torch.stack([layer().values[r][:, c] for r, c in zip(rows.tolist(), holes)])
    assert by_row.buffers()[1].shape == (3, 3, 5, 4) and torch.equal(by_row.values, want)


def test_a_step_that_finishes_no_request_wakes_no_waiting_caller(lm, monkeypatch):
    """Callers waiting on the decode loop are woken when a request is queued, when a step finishes a request and
    when the loop's leader leaves, not after every step: at 16 concurrent searches every waiting thread had woken
    after each step only to wait again (s47)."""
    notified, steps = [], []

    class Counting(threading.Condition):
        def notify_all(self):
            notified.append(len(steps))
            super().notify_all()

    lm._cv = Counting()
    real_step = _Batch.step
    monkeypatch.setattr(_Batch, "step", lambda self, owner: (steps.append(1), real_step(self, owner))[1])
    out = lm.generate([short_prompt(lm)], 2, stop=(), temperature=1.0, max_new_tokens=16, seed=3)
    assert len(out[0]) == 2 and len(steps) >= 8
    # queued (before any step), the step that finished the request, the leader leaving (after the last step)
    assert notified[0] == 0 and len(notified) <= 3 and notified[1:] == [len(steps)] * (len(notified) - 1)
