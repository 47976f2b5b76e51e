"""What drafts cost and buy, replayed offline: `python -m tests.draft_replay --problems 10`.

The engine's drafts (alphamath/lm/lookup.py) never change what is sampled: a draft token is kept only
where the sampled token equals it. So a search's samples, recorded once with drafts off, tell exactly
what any draft rule would have accepted. This records every sample of MCTS searches (prompt tokens and
sampled tokens) and replays each sample alone under several rules: tokens gained per sequential decode
step, draft positions rejected per generated token (what the token ratio of `make bench` counts as
computed for nothing), and a one-row step's cost per token at a query row's cost `--row-cost`.

The rules keep the lookup's draft (3-gram, else 2-gram, else 1-gram match) but cut it by how far the
match reaches back (m: the tokens before the draft point that equal those before the earlier
occurrence): a long match is a copy in progress (the question's numbers, a variable's name, the
format), a one-token match a guess.
"""
from __future__ import annotations

import argparse
import json

from alphamath.lm.lookup import N_MAX, Lookup, draft_cut, reach


def draft_with_reach(look: Lookup, length: int, k: int) -> tuple[list[int], int]:
    """The lookup's draft of up to k tokens after tokens[:length], and its match's reach."""
    t = look.tokens
    look.extend_to(length)
    for n in range(min(N_MAX, length), 0, -1):
        e = look.index.get(tuple(t[length - n:length]))
        if e is not None:
            return t[e:min(e + k, length)], reach(t, length, e)
    return [], 0


def replay(samples: list[tuple[list[int], list[int]]], keep, row_cost: float) -> dict:
    """Decode each sample alone: a step feeds the last token and keep(m) draft tokens; it gains the
    accepted prefix of the draft plus one sampled token."""
    steps = gen = rejected = 0
    cost = 0.0
    for prompt, sample in samples:
        tokens = prompt + sample
        look = Lookup([])  # indexed only up to each draft point (extend_to), never past it
        look.tokens = tokens
        length = len(prompt) + 1  # the first token comes from the prefill's logits
        steps, cost = steps + 1, cost + 1
        while length < len(tokens):
            draft, m = draft_with_reach(look, length, 4)
            draft = draft[:keep(m)]
            a = 0
            while a < len(draft) and length + a < len(tokens) and draft[a] == tokens[length + a]:
                a += 1
            rejected += len(draft) - a
            cost += 1 + row_cost * len(draft)
            steps += 1
            length += min(a + 1, len(tokens) - length)
        gen += len(sample)
    return {"tokens_per_step": gen / steps, "rejected_per_token": rejected / gen, "cost_per_token": cost / gen,
            "generated": gen}


RULES = {
    "no drafts": lambda m: 0,
    "1 token": lambda m: 1,
    "4 tokens (the engine's longest)": lambda m: 4,
    "m >= 4: 1, m >= 8: 2, m >= 16: 4 (the engine's, lookup.draft_cut)": draft_cut,
    "m >= 6: 1, m >= 8: 2, m >= 16: 4": lambda m: 0 if m < 6 else 1 if m < 8 else 2 if m < 16 else 4,
    "1, m >= 4: 2, m >= 8: 3, m >= 16: 4": lambda m: 1 if m < 4 else 2 if m < 8 else 3 if m < 16 else 4,
    "m >= 2: 1, m >= 4: 2, m >= 16: 4": lambda m: 0 if m < 2 else 1 if m < 4 else 2 if m < 16 else 4,
    "m >= 8: 4": lambda m: 4 if m >= 8 else 0,
    "m >= 16: 4": lambda m: 4 if m >= 16 else 0,
}


def record(data: str, problems: int) -> list[tuple[list[int], list[int]]]:
    """Every finished sample of MCTS (N=10, n=5, 4 leaves per call, 128 tokens, depth 8) on the first
    `problems` problems, drafts off."""
    from alphamath.data import load_problems
    from alphamath.lm import kv
    from alphamath.runtime import load_engine
    from alphamath.search_config import SearchConfig
    from search_svc.engine import solve

    out: list = []
    store = kv._Batch._store

    def recording(self, b, cache):
        smp = self.samples[b]
        out.append((list(smp.prompt.tokens), list(smp.tokens)))
        return store(self, b, cache)

    kv._Batch._store = recording
    try:
        engine = load_engine()
        engine.lm.draft_rows = 0
        cfg = SearchConfig(iterations=10, n_children=5, max_new_tokens=128, max_depth=8, leaves_per_call=4)
        for p in load_problems(data, problems):
            solve(p.question, "mcts", engine.policy, engine.value, engine.sandbox, cfg, ground_truth=p.answer,
                  question_id=p.id, rewards=True)
        engine.sandbox.close()
    finally:
        kv._Batch._store = store
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", help="JSONL problems (repeatable; default: GSM8K dev and "
                                                    "data/handwritten/dev.jsonl)")
    ap.add_argument("--problems", type=int, default=10, help="per data file")
    ap.add_argument("--samples", help="read recorded samples from this JSON instead of searching")
    ap.add_argument("--save", help="write the recorded samples here")
    ap.add_argument("--row-cost", type=float, default=0.085, help="a query row's cost / a one-row step's")
    a = ap.parse_args(argv)
    if a.samples:
        samples = [tuple(s) for s in json.load(open(a.samples))]
    else:
        from pathlib import Path
        root = Path(__file__).resolve().parents[1]
        files = a.data or [str(root.parent / "shared/data/gsm8k/dev.jsonl"), str(root / "data/handwritten/dev.jsonl")]
        samples = [s for f in files for s in record(f, a.problems)]
        if a.save:
            Path(a.save).write_text(json.dumps(samples))
    print(f"{len(samples)} samples, {sum(len(s) for _, s in samples)} generated tokens; row cost {a.row_cost}")
    print("| draft rule | tokens per step | rejected draft positions per token | one-row step cost per token |")
    print("|---|---|---|---|")
    for name, keep in RULES.items():
        r = replay(samples, keep, a.row_cost)
        print(f"| {name} | {r['tokens_per_step']:.3f} | {r['rejected_per_token']:.3f} | {r['cost_per_token']:.3f} |")


if __name__ == "__main__":
    main()
