"""The value probe's arithmetic: features read where a lone forward of each state reads, the
supervision sets it compares, the balancing weights, and a ridge fit that recovers a linear rule."""
import numpy as np
import torch

from alphamath.steps import Step
from search_svc.mcts import backup
from tests.pipeline import make_tree
from tests.value_probe import capped_node_ids, features, fit, judge, layer_sweep, training_data, tree_rows


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



def test_all_layer_features_read_every_layer_at_the_end_and_over_the_step(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    t = make_tree(answers=("4", "5"), code_error_path=True)
    feats = features(model, tok, t, batch=2, all_layers=True)
    assert set(feats) == {n.id for n in t.nodes if n.id != 0}
    for i, f in feats.items():
        ids = tok(t.state(i), add_special_tokens=False)["input_ids"]
        parent = len(tok(t.state(t.nodes[i].parent), add_special_tokens=False)["input_ids"])
        with torch.inference_mode():
            hs = model.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        alone = torch.stack(hs, 1)[0].float()  # [layers + 1, T, H]
        assert f.shape == (2, model.config.num_hidden_layers + 1, model.config.hidden_size)
        np.testing.assert_allclose(f[0], alone[:, -1].numpy(), rtol=2e-3, atol=2e-3)  # stored as float16
        np.testing.assert_allclose(f[1], alone[:, parent:].mean(1).numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(f[0, -1], features(model, tok, t)[i], rtol=2e-3, atol=2e-3)

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


def test_layer_sweep_finds_the_layer_that_carries_the_value():
    rng = np.random.default_rng(1)
    rows = []
    for q in range(12):  # 12 trees of 40 states; layer 2 at the state end holds the target, all else noise
        X = rng.normal(size=(40, 2, 4, 6)).astype(np.float16)
        y = np.tanh(X[:, 0, 2].astype(float) @ np.array([0.8, -0.5, 0.3, 0.0, 0.0, 0.2]))
        rows.append({"X": X, "ids": list(range(40)), "y": y, "answer": np.abs(y) > 0.3, "correct": y > 0.3,
                     "step": np.ones(40, bool), "capped": np.ones(40, bool)})
    out = layer_sweep(rows, k=3, say=lambda *_: None)
    assert min((k for k in out if not k.startswith("curve")), key=lambda k: out[k]["mse_ratio"]) == "end/2"
    assert out["end/2"]["auc"] > 0.95 and out["end/2"]["mse_ratio"] < 0.2
    assert out["end/0"]["mse_ratio"] > 0.9 and out["step_mean/2"]["mse_ratio"] > 0.9
    curve = [out[f"curve/end/2/{n}"]["mse_ratio"] for n in (2, 4, 8)]  # 8 training trees per fold
    assert curve[0] > curve[2]  # more training trees, a better fit
