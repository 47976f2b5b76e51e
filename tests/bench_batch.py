"""Decode throughput and KV of one decode batch of many prompts × n samples (the shape of concurrent
SBS beams and MCTS expansions), with the prompts already in the prefix cache, as a search's states are.

    python -m tests.bench_batch [--prompts 24 --samples 5 --tokens 64]

Each prompt is a hand-written dev question's round-0 prompt followed by six filler steps (~650 tokens).
Every sample runs to --tokens (EOS off). Reports decode tokens per second of step time, the wall,
the largest batch and its KV bytes (own columns plus shared prompts), twice (the second is warm).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILLER = "<step>Let me compute the quantities one at a time.\n<code>\nprint(12 * 7 + 3)\n</code>\n<output>\n87\n</output>\n</step>\n"


def batch_kv_bytes(batch) -> int:
    own = sum(layer._k.nbytes + layer._v.nbytes for layer in batch.layers)
    shared = getattr(batch, "shared", None)  # None before prompts were shared (for A/B runs)
    return own + (sum(k.nbytes + v.nbytes for k, v in zip(shared.keys, shared.values)) if shared else 0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args(argv)
    from alphamath.lm import LocalLM
    from alphamath.lm.kv import _Batch
    from alphamath.model import embedded_checkpoint
    from alphamath.steps import STEP_OPEN, render_prompt

    lm = LocalLM(embedded_checkpoint())
    questions = [json.loads(line)["question"] for line in open(ROOT / "data" / "handwritten" / "dev.jsonl")]
    prompts = [render_prompt(q, lm.tokenizer)[:-len(STEP_OPEN)] + FILLER * 6 + STEP_OPEN
               for q in questions[:args.prompts]]
    lm.eos_ids = set()
    lm.score(prompts)
    steps, step = [], _Batch.step

    def timed(batch, lm_):
        kv = batch_kv_bytes(batch)
        t = time.perf_counter()
        more = step(batch, lm_)
        steps.append((batch.size, time.perf_counter() - t, kv))
        return more

    _Batch.step = timed
    for rep in range(2):
        steps.clear()
        t, before = time.perf_counter(), lm.usage.decode_tokens
        lm.generate(prompts, args.samples, max_new_tokens=args.tokens, seed=rep)
        wall, busy = time.perf_counter() - t, sum(s for _, s, _ in steps)
        print(f"{args.prompts} prompts (~{len(lm.encode(prompts[0]))} tokens) x {args.samples} samples x {args.tokens} "
              f"tokens: wall {wall:.2f} s, {len(steps)} steps, up to {max(r for r, _, _ in steps)} rows, "
              f"{(lm.usage.decode_tokens - before) / busy:.0f} decode tokens/s, batch KV {max(k for _, _, k in steps) / 1e6:.0f} MB",
              flush=True)


if __name__ == "__main__":
    main()
