"""Every search method once on a real LocalLM (tiny random Llama) with the real sandbox and
answer checker: the pieces fit, and the tree invariants hold whatever the model writes."""
import math

import pytest

from alphamath.lm import LocalLM
from alphamath.tree import Tree
from alphamath.local import LocalPolicy, LocalValue
from alphamath.search_config import SearchConfig
from search_svc.engine import solve

FAILED = ("answer", "malformed", "max_depth", "code_errors")


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from alphamath.sandbox.executor import Executor
    lm = LocalLM(tiny_model_dir)
    with Executor(backend="runsc") as box:
        yield LocalPolicy(lm), LocalValue(lm), box, lm


CFG = SearchConfig(iterations=4, n_children=3, max_new_tokens=24, max_depth=3, beam_b1=2, beam_b2=2, majority_k=3)


@pytest.mark.parametrize("method", ["greedy", "sbs", "mcts", "majority"])
def test_each_method_runs_on_the_tiny_model(engine, method):
    policy, value, box, lm = engine
    before = lm.usage.computed
    tree = solve("What is 2 + 3?", method, policy, value, box, CFG, ground_truth="5", question_id="t")
    assert lm.usage.computed > before
    assert len(tree.nodes) > 1 and tree.meta["method"] == method and tree.meta["sandbox_backend"] == "runsc"
    for n in tree.nodes[1:]:
        assert 0 < n.prior <= 1 and n.depth <= CFG.max_depth
        assert n.kind in ("text", "code", "answer", "malformed")
        assert n.terminal_reason is None or n.terminal_reason in FAILED + ("children_terminal", "no_children")
        assert -1 - 1e-6 <= n.Q <= 1 + 1e-6
    assert Tree.from_json(tree.to_json()).to_json() == tree.to_json()
    if method == "mcts":
        backed_up_terminals = sum(n.terminal_reason in FAILED for n in tree.nodes)
        assert tree.root.N == tree.meta["iterations_done"] + backed_up_terminals
        assert 1 <= tree.meta["iterations_done"] <= CFG.iterations
        for n in tree.nodes:  # N of a node = its own backups + its children's
            own = 1 if n.terminal_reason in FAILED else 0
            expanded = 1 if n.children and n.value is not None else 0
            assert n.N == own + expanded + sum(tree.nodes[c].N for c in n.children) or n.N == 0
    if method == "sbs":
        assert all(math.isfinite(n.value) for n in tree.nodes[1:] if n.value is not None)
