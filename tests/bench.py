"""`make bench`: speed and token targets, measured side by side in one run on the embedded model.

Engine vs naive (issue 2): MCTS problems are searched with the prefix-cached engine (policy and
value share one LocalLM); then the naive baseline (re-encode every prompt, one generate per sample,
one full forward per state) redoes exactly the same model calls on the same tree, so both sides do
the same search and sandbox work and differ only in how the model is run. Reported: tokens the
model computed / unique tokens in the tree (target <= 1.3), and seconds per problem (target: engine
>= 3x faster than naive), one problem at a time and, for the engine, with the problems searched at
once (as `generate --concurrency` and the gRPC server run them; the naive baseline has nothing to
share between searches, so its one-by-one time is its time).
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


class Recorder:
    """Wraps the engine's policy and value: records every call and the seconds spent in them, so
    the naive baseline can redo exactly the same model work on exactly the same tree."""

    def __init__(self, policy, value):
        self.policy, self.value, self.calls, self.model_s = policy, value, [], 0.0

    def render_prompt(self, question):
        return self.policy.render_prompt(question)

    def generate(self, prompts, n, **kw):
        t0 = time.perf_counter()
        out = self.policy.generate(prompts, n, **kw)
        self.model_s += time.perf_counter() - t0
        self.calls.append(("generate", list(prompts), out))
        return out

    def score(self, states):
        t0 = time.perf_counter()
        out = self.value.score(states)
        self.model_s += time.perf_counter() - t0
        self.calls.append(("score", list(states), None))
        return out


def naive_replay(model, tokenizer, calls) -> tuple[float, int]:
    """Seconds and tokens computed by the naive baseline for the same calls: every sample is its own
    generate (prefill the whole prompt, then one cached forward per generated token, each followed by
    the LM head and a log-softmax over the vocabulary, as HF generate with logprobs does) and every
    state a full forward read by the value head. Returns (seconds, tokens computed)."""
    import torch

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def next_token_logprobs(h):
        return torch.log_softmax(model.lm_head(h[:, -1]).float(), dim=-1)

    computed, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for kind, texts, out in calls:
            for i, text in enumerate(texts):
                prompt = ids(text)
                if kind == "score":
                    model.values_from_hidden(model.hidden(torch.tensor([prompt]))[0][:, -1])
                    computed += len(prompt)
                    continue
                for sample in out[i]:
                    h, cache = model.hidden(torch.tensor([prompt]), use_cache=True)
                    next_token_logprobs(h)
                    gen = (ids(sample.text) + [tokenizer.eos_token_id] * sample.token_count)[: sample.token_count]
                    for pos, tok in enumerate(gen[:-1]):
                        h, cache = model.hidden(torch.tensor([[tok]]), past_key_values=cache, use_cache=True,
                                                position_ids=torch.tensor([[len(prompt) + pos]]))
                        next_token_logprobs(h)
                    computed += len(prompt) + max(len(gen) - 1, 0)
    return time.perf_counter() - t0, computed


def engine_vs_naive(args) -> dict:
    from alphamath.lm import LocalLM
    from alphamath.model import embedded_checkpoint
    from policy_svc.local import LocalPolicy
    from sandbox_svc.executor import Executor
    from search_svc.config import SearchConfig
    from search_svc.engine import solve
    from value_svc.local import LocalValue

    problems = load_problems(args.data, args.problems)
    cfg = SearchConfig(iterations=args.iterations, n_children=args.n_children, max_new_tokens=args.max_new_tokens)
    lm = LocalLM(embedded_checkpoint())
    sandbox = Executor(backend="runsc")
    print(f"engine vs naive: {len(problems)} problems, MCTS N={cfg.iterations}, n={cfg.n_children}, "
          f"dtype {lm.model.dtype}, sandbox {sandbox.backend}; the naive baseline redoes the engine's "
          f"model calls on the same tree", flush=True)
    rows = []
    for p in problems:
        lm.reset_cache()
        rec = Recorder(LocalPolicy(lm), LocalValue(lm))
        before = lm.usage.computed
        t0 = time.perf_counter()
        tree = solve(p.question, "mcts", rec, rec, sandbox, cfg, ground_truth=p.answer, question_id=p.id,
                     rewards=True)
        wall = time.perf_counter() - t0
        naive_s, naive_computed = naive_replay(lm.model, lm.tokenizer, rec.calls)
        r = dict(id=p.id, nodes=len(tree.nodes) - 1, unique=unique_tokens(tree, lm.tokenizer),
                 engine_wall_s=wall, engine_model_s=rec.model_s, engine_computed=lm.usage.computed - before,
                 naive_model_s=naive_s, naive_computed=naive_computed)
        r["naive_wall_s"] = wall - rec.model_s + naive_s  # same tree, same sandbox and search work
        rows.append(r)
        print(f"  {p.id}: {r['nodes']} nodes, unique {r['unique']} tokens; engine {wall:.1f} s wall "
              f"({rec.model_s:.1f} s model, {r['engine_computed']} tokens); naive {r['naive_wall_s']:.1f} s wall "
              f"({naive_s:.1f} s model, {naive_computed} tokens)", flush=True)

    def total(k):
        return sum(r[k] for r in rows)

    # The same problems searched at once, as `alphamath generate/eval --concurrency` and the gRPC
    # server run them: their generate() calls share decode batches. Engine only; the naive baseline
    # has nothing to share (one generate per sample), so its sequential time stands.
    from types import SimpleNamespace

    from alphamath.cli import _solve_each
    lm.reset_cache()
    conc_nodes = []
    t0 = time.perf_counter()
    _solve_each(SimpleNamespace(policy=LocalPolicy(lm), value=LocalValue(lm), sandbox=sandbox, lm=lm), problems,
                "mcts", cfg, len(problems), lambda p, tree, secs: conc_nodes.append(len(tree.nodes) - 1), rewards=True)
    conc_s = (time.perf_counter() - t0) / len(problems)

    out = {"problems": len(rows), "iterations": cfg.iterations, "rows": rows,
           "engine_computed_over_unique": total("engine_computed") / max(total("unique"), 1),
           "naive_computed_over_unique": total("naive_computed") / max(total("unique"), 1),
           "engine_s_per_problem": total("engine_wall_s") / len(rows),
           "naive_s_per_problem": total("naive_wall_s") / len(rows),
           "model_speedup": total("naive_model_s") / max(total("engine_model_s"), 1e-9)}
    out["speedup_per_problem"] = out["naive_s_per_problem"] / out["engine_s_per_problem"]
    out["concurrent_engine_s_per_problem"] = conc_s
    out["concurrent_nodes"] = sum(conc_nodes)
    out["concurrent_speedup_per_problem"] = out["naive_s_per_problem"] / conc_s
    print("\n| measure | engine | naive | target |\n|---|---|---|---|")
    print(f"| computed / unique tokens | {out['engine_computed_over_unique']:.2f} | "
          f"{out['naive_computed_over_unique']:.2f} | engine <= 1.3 |")
    print(f"| seconds per MCTS problem (wall) | {out['engine_s_per_problem']:.1f} | {out['naive_s_per_problem']:.1f} | "
          f"naive/engine = {out['speedup_per_problem']:.2f}x (>= 3x) |")
    print(f"| seconds per MCTS problem, the {len(rows)} searched at once (engine; trees of {out['concurrent_nodes']} "
          f"nodes vs {total('nodes')} one by one) | {conc_s:.1f} | {out['naive_s_per_problem']:.1f} | "
          f"naive/engine = {out['concurrent_speedup_per_problem']:.2f}x |")
    print(f"| model seconds (policy + value) | {total('engine_model_s'):.1f} | {total('naive_model_s'):.1f} | "
          f"naive/engine = {out['model_speedup']:.2f}x |")
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
