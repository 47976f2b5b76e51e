"""Batched MCTS (several leaves per model call, virtual loss): batch 1 is the unbatched search."""
from __future__ import annotations

import hashlib
import random
from dataclasses import replace

import pytest

from alphamath.steps import STEP_OPEN, Step
from alphamath.tree import Tree
from search_svc import mcts as M
from alphamath.search_config import SearchConfig
from search_svc.expand import evaluate, expand
from tests.fakes import ScriptedSandbox, exact, sample


def h(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class HashPolicy:
    """Deterministic but varied children: each sample depends on (prompt, index) only."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def render_prompt(self, question):
        return f"Q: {question}\n{STEP_OPEN}"

    def generate(self, prompts, n, *, stop, temperature, top_p=1.0, max_new_tokens=256, seed=None):
        self.calls.append(list(prompts))
        out = []
        for p in prompts:
            row = []
            for j in range(n):
                x = h(p, j)
                prior = (x % 90 + 5) / 100
                kind = x % 10
                if kind == 0:
                    row.append(sample("So \\boxed{7}</step>", prior))
                elif kind == 1:
                    row.append(sample("So \\boxed{5}</step>", prior))
                elif kind == 2:
                    row.append(sample("unsure", prior, finish="eos"))
                else:
                    row.append(sample(f"Step {x % 7}</step>", prior))
            out.append(row)
        return out


class HashValue:
    def __init__(self):
        self.calls: list[int] = []

    def score(self, states):
        self.calls.append(len(states))
        return [(h(s) % 201 - 100) / 100 for s in states]


def unbatched_mcts(tree, policy, value, sandbox, cfg, check):
    """The search before batching (one leaf per call), kept here as the reference for batch 1."""
    rng = random.Random(cfg.seed)
    done = 0
    for i in range(cfg.iterations):
        seed = cfg.seed * 100_003 + i
        leaf = M.select_leaf(tree, cfg.c_puct, rng)
        if leaf is None:
            if check is None or tree.ground_truth is None or any(n.correct for n in tree.nodes):
                break
            if not M.resample(tree, policy, value, sandbox, cfg, check, seed=seed):
                break
        else:
            children = expand(tree, [leaf.id], cfg.n_children, policy, sandbox, cfg, seed=seed)[0]
            terminals = [c for c in children if c.terminal]
            for child, v in zip(terminals, evaluate(tree, terminals, value, check)):
                M.backup(tree, child.id, v)
            if leaf.value is None:
                evaluate(tree, [leaf], value, check)
            M.backup(tree, leaf.id, leaf.value)
        done += 1
    return M.finish(tree, M.best_answer_node(tree, cfg.select_by), check)


def shape(tree: Tree):
    return [(n.parent, n.text, n.kind, n.N, n.W, n.value, n.terminal_reason, n.correct) for n in tree.nodes]


def run(search, cfg, ground_truth):
    tree = Tree(question="q", prompt="Q: q\n" + STEP_OPEN, ground_truth=ground_truth)
    policy, value = HashPolicy(), HashValue()
    search(tree, policy, value, ScriptedSandbox(), cfg, exact if ground_truth else None)
    return tree, policy, value


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("ground_truth", [None, "7"])
def test_batch_one_gives_exactly_the_unbatched_tree(seed, ground_truth):
    cfg = SearchConfig(iterations=12, n_children=3, max_depth=4, seed=seed, leaves_per_call=1)
    new, p_new, v_new = run(M.mcts, cfg, ground_truth)
    ref, p_ref, v_ref = run(unbatched_mcts, cfg, ground_truth)
    assert len(new.nodes) > 4  # the tree grew: the comparison is not between two empty searches
    assert shape(new) == shape(ref)
    assert p_new.calls == p_ref.calls and v_new.calls == v_ref.calls
    assert new.meta["answer_node"] == ref.meta["answer_node"]


def test_several_leaves_per_call_share_one_policy_call_and_spend_the_budget():
    cfg = SearchConfig(iterations=9, n_children=3, max_depth=5, seed=0, leaves_per_call=4)
    tree, policy, value = run(M.mcts, cfg, None)
    assert max(len(c) for c in policy.calls) > 1  # leaves were batched
    assert all(len(set(c)) == len(c) for c in policy.calls)  # distinct leaves per call
    assert all(len(c) <= 4 for c in policy.calls)
    assert tree.meta["iterations_done"] == 9
    # Every simulation backs up its leaf, so the root's visits are the leaves expanded plus the
    # terminal children backed up (virtual visits leave no trace).
    leaf_backups = sum(len(c) for c in policy.calls)
    terminal_backups = sum(1 for n in tree.nodes[1:] if n.terminal and n.terminal_reason not in M.EXHAUSTED)
    assert tree.root.N == leaf_backups + terminal_backups
    assert leaf_backups == 9


def test_virtual_loss_steers_the_second_descent_and_is_undone_bit_for_bit():
    """Root with two children: A (prior 0.9) would win every descent; with a virtual loss on A's
    path the second descent picks B. N and W come back exactly as they were."""
    tree = Tree(question="q", prompt="p")
    a = tree.add_child(0, Step("A", "text"), prior=0.9)
    b = tree.add_child(0, Step("B", "text"), prior=0.3)
    for node, v in ((a, 0.1), (b, 0.1)):
        M.backup(tree, node.id, v)
    before = [(n.N, n.W) for n in tree.nodes]
    assert M.select_leaf(tree, 1.25, random.Random(0)) is a
    leaves = M.select_leaves(tree, 2, 1.25, random.Random(0))
    assert [n.id for n in leaves] == [a.id, b.id]
    assert [(n.N, n.W) for n in tree.nodes] == before


def test_select_leaves_stops_when_the_only_leaf_is_already_taken():
    tree = Tree(question="q", prompt="p")
    assert [n.id for n in M.select_leaves(tree, 3, 1.25, random.Random(0))] == [0]
    assert (tree.root.N, tree.root.W) == (0, 0.0)


def test_leaves_per_call_is_validated():
    with pytest.raises(ValueError, match="leaves_per_call"):
        replace(SearchConfig(), leaves_per_call=0).validate()
