"""Fitting the value head on frozen trunk features: folds keep questions whole, the fit recovers a
signal that is there, the L2 strength is chosen on held-out questions, and features are what the
engine gives the head at inference."""
from __future__ import annotations

import torch

from alphamath.steps import STEP_OPEN
from tests.pipeline import make_tree
from trainer_svc.examples import extract_examples
from trainer_svc.head_fit import Features, choose_l2, cv_mse, fit_head, folds, predict, state_key, step_features


def synthetic(n_q=20, per_q=10, dim=8, noise=0.0, seed=0) -> Features:
    """Targets tanh(2 * x[0]) (+ noise): dimension 0 carries the signal, the rest is noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_q * per_q, dim, generator=g) * 3 + 5  # offset and scale: standardisation matters
    y = torch.tanh(2 * (x[:, 0] - 5) / 3) + noise * torch.randn(len(x), generator=g)
    return Features(x, y.clamp(-1, 1), torch.ones(len(x)), [f"q{i // per_q}" for i in range(len(x))],
                    ["s"] * len(x))


def test_folds_hold_whole_questions_and_cover_every_row():
    groups = [f"q{i % 7}" for i in range(40)]
    parts = folds(groups, 3)
    assert sorted(i for p in parts for i in p) == list(range(40))
    owner = {}
    for k, p in enumerate(parts):
        for i in p:
            assert owner.setdefault(groups[i], k) == k  # a question never spans two folds
    assert parts == folds(groups, 3) and len(folds(["a", "a"], 5)) == 1  # empty folds are dropped


def test_fit_recovers_the_signal_in_raw_coordinates():
    f = synthetic()
    w, b = fit_head(f, l2=1e-4)
    err = float(((predict(f.x, w, b) - f.y) ** 2).mean())
    const = float(((f.y - f.y.mean()) ** 2).mean())
    assert err < 0.02 * const
    assert w[0].abs() > 10 * w[1:].abs().max()  # the weight sits on the informative dimension


def test_a_constant_target_gives_the_constant():
    f = synthetic()
    f.y = torch.full_like(f.y, -0.6)
    w, b = fit_head(f, l2=1e-2)
    assert torch.allclose(predict(f.x, w, b), torch.full_like(f.y, -0.6), atol=1e-3)


def test_l2_is_chosen_on_held_out_questions():
    # few questions, many noise dimensions: without a penalty the fit memorises the training folds
    f = synthetic(n_q=12, per_q=4, dim=40, noise=0.5, seed=3)
    best, table = choose_l2(f, grid=(1e-6, 1.0), k=4)
    assert set(table) == {1e-6, 1.0} and table[best] == min(table.values())
    assert best == 1.0 and table[1.0] < table[1e-6]
    assert cv_mse(f, 1.0, k=4) == table[1.0]
    assert table[1.0] < cv_mse(f, None, k=4)  # the signal on dimension 0 beats the constant predictor
    assert abs(cv_mse(f, 1e6, k=4) - cv_mse(f, None, k=4)) < 1e-3  # all penalty: the constant


def test_features_are_the_engines_input_to_the_head_at_each_state(tiny_model_dir):
    """step_features reads each distinct state once, through LocalLM.features: the trunk's output at
    the state's own last token, as `score` reads it, whether or not its prefix was cached."""
    from alphamath.lm import LocalLM

    trees = [make_tree("q1", answers=("4", "5")), make_tree("q2", answers=("4", "7", "9"))]
    exs = [e for t in trees for e in extract_examples(t)]
    lm = LocalLM(tiny_model_dir, dtype="fp32")
    f = step_features(lm, exs, chunk=2)
    # the shared code step is kept once per question: q1 has 1 + 2 states, q2 has 1 + 3
    assert f.groups.count("q1") == 3 and f.groups.count("q2") == 4 and len(set(f.keys)) == 7
    assert torch.allclose(f.y.sort().values, torch.tensor(sorted([0.0, 1.0, -1.0, -1 / 3, 1.0, -1.0, -1.0])))
    assert lm.reused_tokens > 0  # children found their parents (and every state its prompt) cached
    model = lm.model
    for i in (0, len(f.y) - 1):  # a first step and a deepest state, recomputed from nothing
        ex = next(e for e in exs if any(state_key(e, k) == f.keys[i] for k in range(len(e.steps))))
        k = next(k for k in range(len(ex.steps)) if state_key(ex, k) == f.keys[i])
        ids = torch.tensor([lm.encode(ex.prompt + STEP_OPEN.join(ex.steps[:k + 1]))])
        with torch.no_grad():
            h, _ = model.hidden(ids)
        assert torch.allclose(f.x[i], h[0, -1].float(), atol=1e-4)
        assert f.last_steps[i] == ex.steps[k] and f.y[i] == ex.values[k]


def test_a_fitted_checkpoint_scores_states_at_inference_as_the_fit_predicted(tiny_model_dir, tmp_path):
    """The fit and inference read the same features: the head written to the checkpoint gives,
    through LocalLM.score, the values the fit predicted."""
    from alphamath.lm import LocalLM
    from trainer_svc.head_fit import fit_checkpoint

    trees = [make_tree(f"q{i}", answers=("4", str(i + 5))) for i in range(6)]
    info = fit_checkpoint(str(tiny_model_dir), trees, str(tmp_path / "fit"), holdout=0.0, dtype="fp32")
    assert info["questions"] == 6 and info["paths"] == 12 and info["states"] == 18
    lm = LocalLM(tmp_path / "fit", dtype="fp32")
    assert lm.model.value_head.weight.abs().sum() > 0
    exs = [e for t in trees for e in extract_examples(t)]
    f = step_features(LocalLM(tiny_model_dir, dtype="fp32"), exs)
    head = lm.model.value_head
    with torch.no_grad():
        expected = predict(f.x, head.weight[0].float(), float(head.bias))
    states = [next(e.prompt + STEP_OPEN.join(e.steps[:k + 1]) for e in exs for k in range(len(e.steps))
                   if state_key(e, k) == key) for key in f.keys]
    assert len(states) == 18 and set(states) == {t.state(n.id) for t in trees for n in t.nodes if n.id != 0}
    got = lm.score(states)
    assert torch.allclose(torch.tensor(got), expected, atol=1e-4)
    # a fitted head is not constant; the untrained (zero) head of the base is, and says 0
    from alphamath.local import LocalValue
    assert LocalValue(lm).constant is None and LocalValue(LocalLM(tiny_model_dir, dtype="fp32")).constant == 0.0


def test_the_probe_judges_a_head_fit_on_one_set_of_questions_on_another():
    from tests.head_fit_probe import split
    train, test = synthetic(seed=1), synthetic(n_q=10, seed=2)
    test.last_steps = [f"So \\boxed{{{i}}}." if i % 2 else "Think." for i in range(len(test.y))]  # half are answers
    r = split(train, test, balanced=False)
    assert r["answers"] == len(test.y) // 2 and r["rows"] == len(test.y)
    assert r["auc"] > 0.95 and r["mse_ratio"] < 0.1  # the signal carries across questions
    test.x = test.x[torch.randperm(len(test.y), generator=torch.Generator().manual_seed(0))]  # features scrambled
    assert split(train, test, balanced=False)["mse_ratio"] > 1.0


def test_features_cost_the_same_when_the_lineage_outgrows_the_cache(tiny_model_dir):
    """Questions a few at a time: every state still finds its prompt and parent cached when all the
    questions' tokens are many times what the prefix cache holds (a lineage at the default budget),
    so a small cache computes what an unbounded one does."""
    from alphamath.lm import LocalLM
    from alphamath.steps import render_prompt

    def features(max_cached_tokens):
        lm = LocalLM(tiny_model_dir, dtype="fp32", max_cached_tokens=max_cached_tokens)
        trees = []
        for i in range(12):
            t = make_tree(f"q{i}", answers=("4", str(i + 5), str(i + 20)))
            t.prompt = render_prompt(f"Tom has {i} pens and buys {i + 2} more. How many does he have?", lm.tokenizer)
            trees.append(t)
        f = step_features(lm, [e for t in trees for e in extract_examples(t)], chunk=4)
        return f, lm.usage.prefill_tokens, len(lm.encode(trees[0].prompt))

    (small, computed, prompt), (big, needed, _) = features(600), features(10**6)
    assert len(small.keys) == 12 * 4 and small.keys == big.keys and torch.allclose(small.x, big.x, atol=1e-5)
    assert 12 * prompt > 600 * 5  # the prompts alone are five times what the small cache holds
    assert computed <= needed + prompt  # at most the shared instructions once more (one pass by depth: 1.7x)
