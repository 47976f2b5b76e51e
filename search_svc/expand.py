"""Expansion and evaluation, shared by every search method.

Expansion keeps every sample: the paper's code drops a whole expansion when one of its n samples
is malformed, which with a small model means trees never grow. Here a malformed sample becomes a
terminal child with reward -1, and the well-formed siblings live on.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from alphamath.interfaces import Policy, Sample, Sandbox, Value
from alphamath.search_config import SearchConfig
from alphamath.steps import STOP, parse_step
from alphamath.tree import Node, Tree

NEGATIVE_REWARD, POSITIVE_REWARD = -1.0, 1.0
Checker = Callable[[str | None, str], bool]


def prior(sample: Sample) -> float:
    """P = exp(mean token log-prob of the step): a length-normalised likelihood in (0, 1]."""
    return math.exp(sample.cumulative_logprob / max(sample.token_count, 1))


def dedupe(samples: Sequence[Sample]) -> tuple[list[Sample], list[float]]:
    """Identical step texts are one child (the first sample's statistics are kept); beside each,
    its share of the samples: merged, a step the policy drew 9 times in 15 is still a 9/15 vote."""
    first: dict[str, int] = {}
    out, counts = [], []
    for s in samples:
        key = s.text.strip()
        if key in first:
            counts[first[key]] += 1
        else:
            first[key] = len(out)
            out.append(s)
            counts.append(1)
    return out, [c / len(samples) for c in counts]


def consecutive_code_errors(tree: Tree, node_id: int) -> int:
    count = 0
    for node in reversed(tree.path(node_id)):
        if not node.code_error:
            break
        count += 1
    return count


def mark_terminal(tree: Tree, node: Node, cfg: SearchConfig) -> None:
    """Apply the paper's terminal rules to a fresh child."""
    if node.kind == "answer":
        node.terminal_reason = "answer"
    elif node.kind == "malformed":
        node.terminal_reason = "malformed"
    elif consecutive_code_errors(tree, node.id) > cfg.max_code_errors:
        node.terminal_reason = "code_errors"
    elif node.depth >= cfg.max_depth:
        node.terminal_reason = "max_depth"


def run_code(tree: Tree, groups: Sequence[tuple[int, Sequence]], sandbox: Sandbox) -> None:
    """Execute the code steps among each group's `steps` (children of its parent node), all groups'
    in one set of parallel sandboxes: with several leaves per model call, waiting leaf by leaf
    left workers idle (4 leaves x 5 samples took 8 waves of sandboxes instead of 5). On a 2-core
    host that buys nothing, since the sandbox boots are CPU-bound there; it pays with cores to spare."""
    jobs = []
    for parent, steps in groups:
        cells = tree.code_cells(parent)  # the path's earlier cells, once per parent
        jobs += [(cells + [s.code], s) for s in steps if s.kind == "code"]
    if not jobs:
        return
    with ThreadPoolExecutor(max_workers=min(4, len(jobs))) as pool:
        results = list(pool.map(lambda job: sandbox.execute(job[0]), jobs))
    for (_, step), res in zip(jobs, results):
        step.code_error = bool(res.error) or res.timed_out
        if res.timed_out:
            step.output = (res.stdout + "\nTimeoutError: code ran too long").strip()
        elif res.error:
            step.output = (res.stdout + "\n" + res.error).strip()
        else:
            step.output = res.stdout


def add_children(tree: Tree, node_ids: Sequence[int], samples: Sequence[Sequence[Sample]],
                 sandbox: Sandbox, cfg: SearchConfig, unique: bool = True) -> list[list[Node]]:
    """Turn each node's samples into children: parse, run code, apply terminal rules (with
    `unique`, a sample identical to an existing child or to an earlier sample is dropped)."""
    parsed = []
    for node_id, node_samples in zip(node_ids, samples):
        if unique:
            kept, shares = dedupe(node_samples)
        else:
            kept, shares = list(node_samples), [1 / len(node_samples) for _ in node_samples]
        steps = [parse_step(s) for s in kept]
        if unique and tree.nodes[node_id].children:  # fresh samples at an expanded node: new steps only
            have = {(n.text.strip(), n.code) for n in map(tree.nodes.__getitem__, tree.nodes[node_id].children)}
            picks = [i for i, st in enumerate(steps) if (st.text.strip(), st.code) not in have]
            kept, steps, shares = [kept[i] for i in picks], [steps[i] for i in picks], [shares[i] for i in picks]
        parsed.append((node_id, kept, steps, shares))
    run_code(tree, [(node_id, steps) for node_id, _, steps, _ in parsed], sandbox)
    out = []
    for node_id, kept, steps, shares in parsed:
        children = []
        for s, step, share in zip(kept, steps, shares):
            child = tree.add_child(node_id, step, prior(s), s.token_count, share)
            mark_terminal(tree, child, cfg)
            children.append(child)
        if not children and not tree.nodes[node_id].children:
            tree.nodes[node_id].terminal_reason = "no_children"
        out.append(children)
    return out


def expand(tree: Tree, node_ids: Sequence[int], width: int, policy: Policy, sandbox: Sandbox,
           cfg: SearchConfig, temperature: float | None = None, seed: int | None = None,
           unique: bool = True) -> list[list[Node]]:
    """Sample `width` next steps for each node in one policy call and add them as children
    (identical samples are merged unless `unique` is False, as independent votes need)."""
    samples = policy.generate(
        [tree.prefix(i) for i in node_ids], width, stop=STOP,
        temperature=cfg.temperature if temperature is None else temperature,
        top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=seed)
    return add_children(tree, node_ids, samples, sandbox, cfg, unique)


def terminal_reward(tree: Tree, node: Node, check: Checker) -> float:
    """With ground truth: +1 for a correct answer, -1 for anything else that ends a path."""
    if node.terminal_reason == "answer":
        node.correct = bool(check(node.answer, tree.ground_truth))
        return POSITIVE_REWARD if node.correct else NEGATIVE_REWARD
    return NEGATIVE_REWARD


def evaluate(tree: Tree, nodes: Sequence[Node], value: Value, check: Checker | None) -> list[float]:
    """Value of each node's state: the reward for terminals when ground truth is known, else the
    value head (failed terminals are -1 either way). Sets node.value and returns the values."""
    out: list[float | None] = [None] * len(nodes)
    to_score = []
    for i, node in enumerate(nodes):
        if node.terminal and node.terminal_reason != "answer":
            out[i] = NEGATIVE_REWARD
        elif node.terminal and tree.ground_truth is not None and check is not None:
            out[i] = terminal_reward(tree, node, check)
        else:
            to_score.append(i)
    if to_score:
        scores = value.score([tree.state(nodes[i].id) for i in to_score])
        for i, v in zip(to_score, scores):
            out[i] = float(v)
    for node, v in zip(nodes, out):
        node.value = v
    return out  # type: ignore[return-value]
