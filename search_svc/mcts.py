"""Monte Carlo Tree Search over steps, as small functions over the explicit tree.

One simulation:
  select    descend from the root by PUCT(child) = Q + c_puct * P * sqrt(N_parent) / (1 + N)
            over non-terminal children (ties broken by a seeded RNG); a node whose children
            are all terminal becomes terminal ("children_terminal") and selection restarts.
  expand    sample n next steps of the selected leaf (identical texts deduplicated).
  evaluate  each new terminal child backs up its reward (+1 correct / -1 otherwise, with ground
            truth; the value head's estimate without); the expanded leaf backs up the value
            head's estimate of its own state.
  backup    N += 1 and W += v from the evaluated node up to the root; Q = W / N.

Batched (cfg.leaves_per_call = k > 1, as in AlphaGo and mctx): up to k distinct leaves are selected
before any is expanded. After each selection a virtual loss is added along the leaf's path,
N += 1 and W -= VIRTUAL_LOSS per node, so the next descent sees that path as visited and lost and
turns elsewhere; the virtual visits are undone (N and W restored exactly) before the real backups.
The k leaves are expanded in one policy call and evaluated in one value call, and count as k
simulations of the budget. With k = 1 no virtual loss is applied and the tree is exactly the
unbatched one.

Unlike the paper's code, a data-generation search (ground truth as reward) whose tree is exhausted
before its budget ends, with no correct path found, spends the rest of the budget on fresh samples
(`resample`): the exhausted node with the best PUCT score gets n new, distinct next steps. A small
policy exhausts its trees early (every child malformed or wrong), and those are exactly the
questions where more looking finds the first correct path, so coverage grows with the budget.
Batched, the node takes k·n fresh samples in one call and counts as k simulations: k resamples of it
in a row as one call, where one at a time a tree of long, malformed samples spent most of its wall in
calls of n rows (a GSM8K tree of 49 nodes: 7 resamples of 5 rows x 128 tokens, s45).
"""
from __future__ import annotations

import math
import random
from typing import Callable

from alphamath.interfaces import Policy, Sandbox, Value
from alphamath.search_config import SearchConfig
from alphamath.tree import Node, Tree
from search_svc.expand import Checker, evaluate, expand

Progress = Callable[[int, Tree], None]


def puct(parent: Node, child: Node, c_puct: float) -> float:
    return child.Q + c_puct * child.prior * math.sqrt(parent.N) / (1 + child.N)


def backup(tree: Tree, node_id: int, value: float) -> None:
    """Add one visit and `value` to every node from node_id up to the root."""
    while node_id is not None:
        node = tree.nodes[node_id]
        node.N += 1
        node.W += value
        node_id = node.parent


def select_child(tree: Tree, node: Node, c_puct: float, rng: random.Random) -> Node | None:
    """The non-terminal child with the highest PUCT score; None if every child is terminal."""
    candidates = [tree.nodes[c] for c in node.children if not tree.nodes[c].terminal]
    if not candidates:
        return None
    scores = [puct(node, c, c_puct) for c in candidates]
    best = max(scores)
    return rng.choice([c for c, s in zip(candidates, scores) if s == best])


def select_leaf(tree: Tree, c_puct: float, rng: random.Random) -> Node | None:
    """Descend to an unexpanded node; None when the whole tree is solved (root terminal)."""
    while not tree.root.terminal:
        node = tree.root
        while node.expanded:
            child = select_child(tree, node, c_puct, rng)
            if child is None:
                node.terminal_reason = "children_terminal"
                break
            node = child
        else:
            return node
    return None


VIRTUAL_LOSS = 1.0  # a loss: the value of a failed terminal


def add_virtual_loss(tree: Tree, node_id: int, saved: dict[int, tuple[int, float]]) -> None:
    """N += 1, W -= VIRTUAL_LOSS from node_id up to the root; each node's real (N, W) is kept in `saved`."""
    while node_id is not None:
        node = tree.nodes[node_id]
        saved.setdefault(node_id, (node.N, node.W))
        node.N += 1
        node.W -= VIRTUAL_LOSS
        node_id = node.parent


def restore(tree: Tree, saved: dict[int, tuple[int, float]]) -> None:
    """Undo virtual losses: every saved node gets its real (N, W) back, bit for bit."""
    for node_id, (n, w) in saved.items():
        tree.nodes[node_id].N, tree.nodes[node_id].W = n, w


def select_leaves(tree: Tree, k: int, c_puct: float, rng: random.Random) -> list[Node]:
    """Up to k distinct unexpanded leaves, a virtual loss on each selected path steering the next
    descent (see the module doc); fewer when a descent returns a leaf already selected or none."""
    leaves: list[Node] = []
    saved: dict[int, tuple[int, float]] = {}
    try:
        while len(leaves) < k:
            if leaves:
                add_virtual_loss(tree, leaves[-1].id, saved)
            leaf = select_leaf(tree, c_puct, rng)
            if leaf is None or any(leaf is x for x in leaves):
                break
            leaves.append(leaf)
    finally:
        restore(tree, saved)
    return leaves


def simulate_batch(tree: Tree, policy: Policy, value: Value, sandbox: Sandbox, cfg: SearchConfig,
                   rng: random.Random, check: Checker | None, k: int, seed: int | None = None) -> int:
    """Select up to k leaves, expand them in one policy call, evaluate the new terminals and then the
    leaves (one value call each), back everything up. Returns the leaves expanded (0: none left)."""
    leaves = select_leaves(tree, k, cfg.c_puct, rng)
    if not leaves:
        return 0
    children = expand(tree, [leaf.id for leaf in leaves], cfg.n_children, policy, sandbox, cfg, seed=seed)
    terminals = [c for kids in children for c in kids if c.terminal]
    for child, v in zip(terminals, evaluate(tree, terminals, value, check)):
        backup(tree, child.id, v)
    fresh = [leaf for leaf in leaves if leaf.value is None]
    if fresh:
        evaluate(tree, fresh, value, check)
    for leaf in leaves:
        backup(tree, leaf.id, leaf.value)
    return len(leaves)


def simulate(tree: Tree, policy: Policy, value: Value, sandbox: Sandbox, cfg: SearchConfig,
             rng: random.Random, check: Checker | None, seed: int | None = None) -> bool:
    """One select-expand-evaluate-backup pass; False when nothing is left to expand."""
    return simulate_batch(tree, policy, value, sandbox, cfg, rng, check, 1, seed=seed) > 0


EXHAUSTED = ("children_terminal", "no_children")  # terminal by search, not by what the step says


def resample(tree: Tree, policy: Policy, value: Value, sandbox: Sandbox, cfg: SearchConfig,
             check: Checker | None, seed: int | None = None, k: int = 1) -> int:
    """Fresh samples at the most promising exhausted node: argmax over nodes whose children all
    ended of PUCT(parent, node) (the root: its Q). Its new distinct children join the tree (which
    is then no longer exhausted along that path), terminals back up their rewards and the node
    backs up its value, as in `simulate`. k > 1 (batched): k * n samples in one call, the node's
    value backed up k times, as k simulations. Returns the simulations run (0: no node can be re-opened)."""
    def score(n: Node) -> float:
        return n.Q if n.parent is None else puct(tree.nodes[n.parent], n, cfg.c_puct)
    candidates = [n for n in tree.nodes if n.terminal_reason in EXHAUSTED]
    if not candidates:
        return 0
    node = max(candidates, key=lambda n: (score(n), -n.id))
    node.terminal_reason = None
    for anc in tree.path(node.id)[:-1] + [tree.root]:  # the path down to it is open again
        if anc.terminal_reason == "children_terminal":
            anc.terminal_reason = None
    children = expand(tree, [node.id], k * cfg.n_children, policy, sandbox, cfg, seed=seed)[0]
    if not children:
        node.terminal_reason = "children_terminal"
    terminals = [c for c in children if c.terminal]
    for child, v in zip(terminals, evaluate(tree, terminals, value, check)):
        backup(tree, child.id, v)
    if node.value is None:
        evaluate(tree, [node], value, check)
    for _ in range(k):
        backup(tree, node.id, node.value)
    return k


def best_answer_node(tree: Tree, select_by: str = "q") -> Node | None:
    """Descend from the root choosing the child with the best Q (or value, or visits); if the
    descent ends without an answer, fall back to the best answer node anywhere in the tree."""
    key = {
        "q": lambda n: (n.Q if n.N else -math.inf, n.N),
        "value": lambda n: (n.value if n.value is not None else -math.inf, n.N),
        "visits": lambda n: (n.N, n.Q),
    }[select_by]
    node = tree.root
    while node.children:
        node = max((tree.nodes[c] for c in node.children), key=key)
    if node.answer is not None:
        return node
    answers = [n for n in tree.nodes if n.terminal_reason == "answer"]
    return max(answers, key=key) if answers else None


def mcts(question_tree: Tree, policy: Policy, value: Value, sandbox: Sandbox, cfg: SearchConfig,
         check: Checker | None = None, on_progress: Progress | None = None) -> Tree:
    """Run cfg.iterations simulations (fewer if the tree is exhausted), cfg.leaves_per_call per
    model call, and record the answer."""
    tree, rng = question_tree, random.Random(cfg.seed)
    done = resampled = i = 0
    while done < cfg.iterations:
        seed = cfg.seed * 100_003 + i
        i += 1
        ran = simulate_batch(tree, policy, value, sandbox, cfg, rng, check,
                             min(cfg.leaves_per_call, cfg.iterations - done), seed=seed)
        if not ran:
            # exhausted: with ground truth and no correct path yet, keep looking (see module doc)
            if check is None or tree.ground_truth is None or any(n.correct for n in tree.nodes):
                break
            ran = resample(tree, policy, value, sandbox, cfg, check, seed=seed,
                           k=min(cfg.leaves_per_call, cfg.iterations - done))
            if not ran:
                break
            resampled += ran
        done += ran
        if check is not None and "first_correct_iteration" not in tree.meta and any(n.correct for n in tree.nodes):
            tree.meta["first_correct_iteration"] = done  # coverage at any smaller budget, from one run
        if on_progress:
            on_progress(done, tree)
    tree.meta["iterations_done"] = done
    tree.meta["resampled"] = resampled
    return finish(tree, best_answer_node(tree, cfg.select_by), check)


def finish(tree: Tree, node: Node | None, check: Checker | None) -> Tree:
    """Record the chosen answer node in the tree's meta (and its correctness if known)."""
    tree.meta["answer_node"] = node.id if node else None
    tree.meta["answer"] = node.answer if node else None
    tree.meta["value"] = node.value if node else None
    if node is not None and tree.ground_truth is not None and check is not None and node.correct is None:
        node.correct = bool(check(node.answer, tree.ground_truth))
    tree.meta["correct"] = node.correct if node else (False if tree.ground_truth is not None else None)
    return tree
