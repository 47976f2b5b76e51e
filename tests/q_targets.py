"""What a value head trained on MCTS Q would learn: Q of answer nodes against open steps, and Q
against the mean outcome (Tree.outcome_values) of the finished paths below each open step.

    python -m tests.q_targets --trees trees.jsonl    (data-generation trees, e.g. `alphamath generate`)
"""
from __future__ import annotations

import argparse
from pathlib import Path
from statistics import mean


def counts(trees) -> dict:
    right, wrong, open_q, below = [], [], [], []
    groups = open_higher = 0
    for t in trees:
        outcome = t.outcome_values()
        for n in t.nodes:
            if n.parent is None or not n.N:
                continue
            if n.terminal_reason == "answer" and n.correct is not None:
                (right if n.correct else wrong).append(n.Q)
            elif not n.terminal:
                open_q.append(n.Q)
                if n.id in outcome:
                    below.append((n.Q, outcome[n.id]))
        for p in t.nodes:
            kids = [t.nodes[i] for i in p.children if t.nodes[i].N]
            opened = [k.Q for k in kids if not k.terminal]
            wrongs = [k.Q for k in kids if k.terminal_reason == "answer" and k.correct is False]
            if opened and wrongs:
                groups += 1
                open_higher += max(opened) > max(wrongs)
    avg = lambda xs: mean(xs) if xs else None  # noqa: E731
    return {"trees": len(trees), "right_answers": len(right), "wrong_answers": len(wrong),
            "answer_q": avg(right + wrong), "open_steps": len(open_q), "open_q": avg(open_q),
            "open_with_outcome": len(below), "their_q": avg([q for q, _ in below]),
            "their_outcome": avg([o for _, o in below]),
            "sibling_groups": groups, "open_above_wrong_answer": open_higher}


def main(argv=None) -> int:
    from alphamath.tree import Tree
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", required=True)
    a = ap.parse_args(argv)
    trees = [Tree.from_json(line) for line in Path(a.trees).read_text().splitlines() if line.strip()]
    for k, v in counts(trees).items():
        print(f"{k:24} {v:.3f}" if isinstance(v, float) else f"{k:24} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
