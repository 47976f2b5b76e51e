"""The bench's baseline (a) replays the engine's search: same tree, or a loud divergence. No timing."""
from __future__ import annotations

import pytest

from alphamath.accounting import needed_tokens, scored_nodes
from alphamath.search_config import SearchConfig
from search_svc.engine import solve
from tests.bench import Diverged, HFReplay, Recorder, shape
from tests.fakes import ScriptedSandbox


@pytest.fixture(scope="module")
def recorded(tiny_model_dir):
    """A tiny-model MCTS search by the engine, with its calls recorded."""
    from alphamath.lm import LocalLM
    from alphamath.local import LocalPolicy, LocalValue

    lm = LocalLM(tiny_model_dir, dtype="fp32")
    rec = Recorder(LocalPolicy(lm), LocalValue(lm))
    cfg = SearchConfig(iterations=3, n_children=3, max_new_tokens=12, temperature=1.0)
    tree = solve("What is 2 + 3?", "mcts", rec, rec, ScriptedSandbox(), cfg)
    return lm, rec, cfg, tree


def test_baseline_a_builds_the_same_tree_and_computes_more(recorded):
    lm, rec, cfg, tree = recorded
    assert any(kind == "generate" for kind, *_ in rec.calls)
    hf = HFReplay(lm, rec.calls)
    again = solve("What is 2 + 3?", "mcts", hf, hf, ScriptedSandbox(), cfg)
    assert shape(again) == shape(tree)
    assert hf.i == len(rec.calls)
    states = [s for kind, texts, _, _ in rec.calls if kind == "score" for s in texts]
    needed = needed_tokens(tree, lm.encode, scored_nodes(tree, states))
    # n copies of every prompt prefilled: more than the search needed, and more than the engine.
    assert hf.computed > needed
    assert hf.computed > lm.usage.computed


def test_baseline_a_refuses_a_different_search(recorded):
    lm, rec, cfg, _ = recorded
    hf = HFReplay(lm, rec.calls)
    with pytest.raises(Diverged):
        solve("What is 7 + 1?", "mcts", hf, hf, ScriptedSandbox(), cfg)
    hf = HFReplay(lm, [])
    with pytest.raises(Diverged):
        hf.score(["anything"])
