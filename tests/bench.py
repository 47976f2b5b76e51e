"""`make bench`: speed and token targets, measured side by side in one run on the embedded model.

Engine vs naive (issue 2): the same MCTS problems are searched once with the prefix-cached engine
(policy and value share one LocalLM) and once with a baseline that re-encodes every prompt. Both use
the same sandbox. Reported: tokens the model computed / unique tokens in the tree (target <= 1.3),
and seconds per problem (target: engine >= 3x faster than naive).
Then the gRPC stack figures (issue 3) from tests/bench_grpc.py.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from alphamath.data import load_problems
from alphamath.tree import Tree

ROOT = Path(__file__).resolve().parents[1]


def unique_tokens(tree: Tree, tokenizer) -> int:
    """Distinct token positions over every state in the tree: the size of the token trie."""
    trie: dict = {}
    count = 0
    texts = [tree.prompt] + [tree.state(n.id) for n in tree.nodes[1:]]
    for text in texts:
        node = trie
        for tok in tokenizer(text, add_special_tokens=False)["input_ids"]:
            if tok not in node:
                node[tok] = {}
                count += 1
            node = node[tok]
    return count


def run_mcts(label, policy, value, sandbox, usage, problems, cfg, tokenizer, reset=None):
    from search_svc.engine import solve
    rows = []
    for p in problems:
        if reset:
            reset()
        before = usage.computed
        t0 = time.perf_counter()
        tree = solve(p.question, "mcts", policy, value, sandbox, cfg, ground_truth=p.answer, question_id=p.id)
        secs = time.perf_counter() - t0
        rows.append(dict(id=p.id, seconds=secs, computed=usage.computed - before,
                         unique=unique_tokens(tree, tokenizer), nodes=len(tree.nodes) - 1,
                         generated=sum(n.token_count for n in tree.nodes)))
        print(f"  {label:<6} {p.id}: {secs:7.1f} s  nodes {rows[-1]['nodes']:3d}  computed {rows[-1]['computed']:6d}"
              f"  unique {rows[-1]['unique']:6d}", flush=True)
    return rows


def engine_vs_naive(args) -> dict:
    from alphamath.lm import LocalLM
    from alphamath.model import embedded_checkpoint
    from policy_svc.local import LocalPolicy, NaivePolicy
    from sandbox_svc.executor import Executor
    from search_svc.config import SearchConfig
    from value_svc.local import LocalValue, NaiveValue

    problems = load_problems(args.data, args.problems)
    cfg = SearchConfig(iterations=args.iterations, n_children=args.n_children, max_new_tokens=args.max_new_tokens)
    lm = LocalLM(embedded_checkpoint())
    sandbox = Executor()
    print(f"engine vs naive: {len(problems)} problems, MCTS N={cfg.iterations}, n={cfg.n_children}, "
          f"dtype {lm.model.dtype}, sandbox {sandbox.backend}", flush=True)
    eng = run_mcts("engine", LocalPolicy(lm), LocalValue(lm), sandbox, lm.usage, problems, cfg, lm.tokenizer,
                   reset=lm.reset_cache)
    naive_p, naive_v = NaivePolicy(lm.model, lm.tokenizer), NaiveValue(lm.model, lm.tokenizer)

    class Both:  # the naive policy and value count separately; sum them
        @property
        def computed(self):
            return naive_p.usage.computed + naive_v.usage.computed

    naive = run_mcts("naive", naive_p, naive_v, sandbox, Both(), problems, cfg, lm.tokenizer)

    def total(rows, k):
        return sum(r[k] for r in rows)

    out = {
        "problems": len(problems), "iterations": cfg.iterations,
        "engine_s_per_problem": total(eng, "seconds") / len(eng),
        "naive_s_per_problem": total(naive, "seconds") / len(naive),
        "engine_computed_over_unique": total(eng, "computed") / max(total(eng, "unique"), 1),
        "naive_computed_over_unique": total(naive, "computed") / max(total(naive, "unique"), 1),
        "engine_s_per_generated_token": total(eng, "seconds") / max(total(eng, "generated"), 1),
        "naive_s_per_generated_token": total(naive, "seconds") / max(total(naive, "generated"), 1),
    }
    out["speedup_per_problem"] = out["naive_s_per_problem"] / out["engine_s_per_problem"]
    out["speedup_per_generated_token"] = out["naive_s_per_generated_token"] / out["engine_s_per_generated_token"]
    print("\n| measure | engine | naive | target |\n|---|---|---|---|")
    print(f"| computed / unique tokens | {out['engine_computed_over_unique']:.2f} | "
          f"{out['naive_computed_over_unique']:.2f} | engine <= 1.3 |")
    print(f"| seconds per MCTS problem | {out['engine_s_per_problem']:.1f} | {out['naive_s_per_problem']:.1f} | "
          f"naive/engine = {out['speedup_per_problem']:.2f}x (>= 3x) |")
    print(f"| ms per generated token | {1000 * out['engine_s_per_generated_token']:.1f} | "
          f"{1000 * out['naive_s_per_generated_token']:.1f} | naive/engine = {out['speedup_per_generated_token']:.2f}x |")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/gsm8k/dev.jsonl"))
    ap.add_argument("--problems", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--n-children", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--skip-grpc", action="store_true")
    ap.add_argument("--json-out", default=str(ROOT / "var/bench.json"))
    args = ap.parse_args(argv)
    report = {"engine_vs_naive": engine_vs_naive(args)}
    if not args.skip_grpc:
        from tests import bench_grpc
        report["grpc"] = bench_grpc.run(report)
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json_out}")


if __name__ == "__main__":
    main()
