"""Step-level beam search SBS(B1, B2), greedy decoding and majority vote.

SBS: the root samples B1*B2 children, every later beam node B2; all children are scored by the
value head and the top B1 - |final| kept. A kept terminal with an answer moves to the final set,
which shrinks the beam.

Unlike the paper's code, where the answer is the kept answer with the highest value, the answer
is a value-weighted vote over every answer the search generated (`vote`): equivalent answers form
a group, and a group scores the sum of its members' (1 + value) / 2, the head's chance that each is
right, each weighted by the share of the search's samples that wrote its path (`path_share`).
Identical samples are one node, so without that weight a step the policy drew 12 times in 15
counted as much as one drawn once, which leans to the policy's rare steps once its samples differ:
with samples at 0.6 the vote by samples answered 36, 41 and 51 of 100 held-out problems at rounds
1-3 where one vote per distinct step answered 28, 40 and 44 on the same trees; at 0.3 the two rules
answered alike (19 won, 17 lost over rounds 0-3), as the samples barely differed (session 50;
`distinct_vote_node` in the tree's meta keeps what the old rule answered, and the evaluation
reports it as `sbs_distinct`). A head that ranks well within a question still decides (one answer
at +0.9 outweighs nine at -0.9). A head that cannot, which at this model size is what
self-training gives (within-question AUC 0.53 at round 1 and 0.60 at round 2, session 33), no
longer picks nearly at random among the samples but falls back on their agreement: under a
constant head the vote is a majority vote. On the same trees it answered 20 and 29 of 100
held-out problems where the highest value answered 15 and 27 (README: so far a gain the size of
run-to-run noise). It also answers when the beam kept no answer (every kept path ran into the
depth limit), where the paper's code returns nothing.
"""
from __future__ import annotations

from itertools import repeat

from alphamath.interfaces import Policy, Sandbox, Value
from alphamath.search_config import SearchConfig
from alphamath.tree import Node, Tree
from search_svc.expand import Checker, evaluate, expand
from search_svc.mcts import finish

FAILED = ("malformed", "max_depth", "code_errors", "no_children")


def sbs(tree: Tree, policy: Policy, value: Value, sandbox: Sandbox, cfg: SearchConfig,
        check: Checker | None = None, equiv: Checker | None = None, on_progress=None) -> Tree:
    beam: list[Node] = [tree.root]
    final: list[Node] = []
    step = 0
    while beam:
        width = cfg.beam_b1 * cfg.beam_b2 if step == 0 else cfg.beam_b2
        groups = expand(tree, [b.id for b in beam], width, policy, sandbox, cfg,
                        seed=cfg.seed * 100_003 + step)
        children = [c for g in groups for c in g]
        # Rank by the value head even with ground truth: SBS is an inference method.
        evaluate(tree, children, value, check=None)
        alive = [c for c in children if c.terminal_reason not in FAILED]
        keep = sorted(alive, key=lambda c: c.value, reverse=True)[: cfg.beam_b1 - len(final)]
        final += [c for c in keep if c.terminal_reason == "answer"]
        beam = [c for c in keep if not c.terminal]
        step += 1
        if on_progress:
            on_progress(step, tree)
    answers = [n for n in tree.nodes if n.terminal_reason == "answer" and n.value is not None]
    tree.meta["iterations_done"] = step
    tree.meta["kept_answers"] = len(final)
    distinct = vote(answers, equiv)  # one vote per distinct step, the rule before session 50: for comparison
    tree.meta["distinct_vote_node"] = distinct.id if distinct else None
    return finish(tree, vote(answers, equiv, weight=lambda n: path_share(tree, n)), check)


def path_share(tree: Tree, node: Node) -> float:
    """The share of the search's samples that led to `node`: the product of `Node.share` along its
    path, an estimate of how often the policy (at the search's temperature, within the kept beams)
    writes this path."""
    share = 1.0
    for n in tree.path(node.id):
        share *= n.share
    return share


def group_answers(answers: list[Node], same: Checker | None = None) -> list[list[Node]]:
    """Answer nodes grouped by equivalence (`same`; default: identical text), in the order each
    group was first seen."""
    same = same or (lambda a, b: a == b)
    groups: list[list[Node]] = []
    for node in answers:
        for g in groups:
            if same(node.answer, g[0].answer):
                g.append(node)
                break
        else:
            groups.append([node])
    return groups


def vote_score(values, weights=None) -> float:
    """A group's score in the vote: the sum of (1 + value) / 2, the head's chance that each is right,
    each times its weight (default 1)."""
    return sum(w * (1 + v) / 2 for v, w in zip(values, repeat(1.0) if weights is None else weights))


def vote(answers: list[Node], same: Checker | None = None, weight=lambda n: 1.0) -> Node | None:
    """Value-weighted vote: each group of equivalent answers scores `vote_score` of its members'
    values and weights; the best group's highest-valued member (ties: the group seen first)."""
    groups = group_answers(answers, same)
    if not groups:
        return None
    best = max(groups, key=lambda g: vote_score((n.value for n in g), (weight(n) for n in g)))
    return max(best, key=lambda n: n.value)


def rollouts(tree: Tree, k: int, temperature: float, policy: Policy, value: Value,
             sandbox: Sandbox, cfg: SearchConfig, on_progress=None) -> list[Node]:
    """k independent solutions sampled step by step, advancing together in one batch per step.
    Samples are not merged (each path is one vote). Returns the k leaves."""
    tips = expand(tree, [0], k, policy, sandbox, cfg, temperature=temperature, seed=cfg.seed,
                  unique=False)[0]
    step = 1
    while any(not t.terminal for t in tips):
        open_ = [i for i, t in enumerate(tips) if not t.terminal]
        groups = expand(tree, [tips[i].id for i in open_], 1, policy, sandbox, cfg,
                        temperature=temperature, seed=cfg.seed * 100_003 + step, unique=False)
        for i, g in zip(open_, groups):
            if g:
                tips[i] = g[0]
        step += 1
        if on_progress:
            on_progress(step, tree)
    return tips


def greedy(tree: Tree, policy: Policy, value: Value, sandbox: Sandbox, cfg: SearchConfig,
           check: Checker | None = None, on_progress=None) -> Tree:
    """One path at temperature 0; its final state is value-scored for reporting."""
    leaf = rollouts(tree, 1, 0.0, policy, value, sandbox, cfg, on_progress)[0]
    evaluate(tree, [leaf], value, check=None)
    return finish(tree, leaf if leaf.terminal_reason == "answer" else None, check)


def majority(tree: Tree, policy: Policy, value: Value, sandbox: Sandbox, cfg: SearchConfig,
             check: Checker | None = None, equiv: Checker | None = None, on_progress=None) -> Tree:
    """k sampled solutions vote; answers are grouped by equivalence, the largest group wins
    (ties go to the group with the higher summed value)."""
    leaves = rollouts(tree, cfg.majority_k, cfg.temperature or 0.6, policy, value, sandbox, cfg, on_progress)
    answered = [n for n in leaves if n.terminal_reason == "answer"]
    evaluate(tree, answered, value, check=None)
    groups = group_answers(answered, equiv)
    tree.meta["votes"] = {g[0].answer: len(g) for g in groups}
    best = max(groups, key=lambda g: (len(g), sum(n.value for n in g)), default=None)
    return finish(tree, max(best, key=lambda n: n.value) if best else None, check)
