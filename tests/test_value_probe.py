"""The value probe's arithmetic: features read where a lone forward of each state reads, the
supervision sets it compares, the balancing weights, and a ridge fit that recovers a linear rule."""
import numpy as np
import torch

from alphamath.steps import Step
from search_svc.mcts import backup
from tests.pipeline import make_tree
from tests.value_probe import capped_node_ids, features, fit, judge, training_data, tree_rows


def test_features_equal_a_lone_forward_of_each_state(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    t = make_tree(answers=("4", "5", "6"), code_error_path=True)
    feats = features(model, tok, t, batch=2)  # batches of leaves with padding
    assert set(feats) == {n.id for n in t.nodes if n.id != 0}
    for i, f in feats.items():
        ids = tok(t.state(i), add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            alone = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1].float().numpy()
        np.testing.assert_allclose(f, alone, atol=1e-4)


def test_supervision_sets_and_balanced_weights():
    t = make_tree(answers=("4", "5", "6", "7", "8", "9"))  # 1 correct, 5 wrong answers
    extra = t.add_child(0, Step("Think.", "text"), prior=0.1)
    backup(t, extra.id, -0.5)  # visited, never finished: no target, so no set supervises it
    feats = {n.id: np.full(3, float(n.id)) for n in t.nodes if n.id != 0}
    rows = [tree_rows(t, feats)]
    capped = capped_node_ids(t)
    assert extra.id not in capped and len(capped) == 1 + 1 + 4  # the code step, 1 correct + 4 of 5 wrong
    X, y, w = training_data(rows, "all")
    assert len(y) == len(feats) - 1 and np.all(w == 1)
    X, y, w = training_data(rows, "all_balanced")
    assert w[y > 0.999].sum() == w[y < -0.999].sum() == 5  # the one correct leaf weighs as the five wrong
    X, y, w = training_data(rows, "capped")
    assert len(y) == 6


def test_ridge_recovers_a_linear_rule_and_judge_reads_it():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 5))
    y = np.tanh(X @ np.array([0.3, -0.2, 0.0, 0.1, 0.0]))
    predict = fit(X, y, np.ones(len(y)), lam=1.0)
    assert np.mean((predict(X) - y) ** 2) < 0.01 * np.var(y)
    answer = y > 0.2
    row = {"X": X, "y": y, "answer": np.abs(y) > 0.2, "correct": answer, "step": np.ones(len(y), bool)}
    r = judge(predict, [row])
    assert r["auc"] > 0.99 and r["mse_ratio"] < 0.05
