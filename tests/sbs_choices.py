"""Where SBS's answer comes from at one checkpoint, and what other selection rules would pick from the
same trees (issue 12: SBS with the trained head against greedy and against a zeroed head).

Runs greedy, SBS(B1, B2) with the checkpoint's head and SBS with the head zeroed on held-out problems,
keeps every answer node each SBS tree generated (depth, value, right or wrong, answer text), and
reports per method: accuracy, the depth of the chosen answer, and alphamath.metrics.per_question
over the tree's answers (within-question AUC of the values, best-of-N by value, a random pick,
majority vote, a value-weighted vote, the oracle); per SBS run also the head's mean value of depth-1 answers against
depth-1 open steps (a head that rates answers above open steps ends its beams early); then exact
sign tests between the methods on the same problems.

    python -m tests.sbs_choices --model var/learn/checkpoints/round-1-XXXX --problems var/learn/heldout.jsonl \
        --out choices.json [--temperature 0.6] [--seed 0] [--anchor]

SBS rows also keep what one vote per distinct step (the vote before session 50) answered on the same
tree, and the report tests the two rules against each other.

`--anchor` adds `sbs_anchor`: SBS where each beam node's B2 children include its greedy (temperature
0) next step, so greedy's own steps are always among the candidates the head ranks (session 37: on
60 fresh arithmetic problems at a round-1 checkpoint it answered 33 against plain SBS's 40 and
greedy's 42; not adopted).
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path


def mean(xs):
    return sum(xs) / len(xs) if xs else None


def run_method(engine, problems, method: str, value, cfg, check, concurrency: int) -> dict:
    """{problem id: {correct, depth (of the chosen answer), answers, opens}} for one method."""
    from search_svc.engine import solve_many
    rows = {}

    def done(p, tree, _secs):
        chosen, distinct = tree.meta.get("answer_node"), tree.meta.get("distinct_vote_node")
        rows[p.id] = {
            "correct": bool(tree.meta.get("correct")),
            # SBS: what one vote per distinct step (the rule before session 50) answered on this tree
            "distinct_correct": None if "distinct_vote_node" not in tree.meta else
            distinct is not None and bool(check(tree.nodes[distinct].answer, p.answer)),
            "depth": tree.nodes[chosen].depth if chosen is not None else None,
            "answers": [{"depth": n.depth, "value": n.value, "correct": bool(check(n.answer, p.answer)),
                         "answer": n.answer} for n in tree.nodes if n.terminal_reason == "answer"],
            "opens": [[n.depth, n.value] for n in tree.nodes
                      if n.id and not n.terminal and n.value is not None],
        }
    rows_per_search = cfg.beam_b1 * cfg.beam_b2 if method == "greedy" else 1
    solve_many(problems, method, engine.policy, value, engine.sandbox, cfg, done,
               concurrency=concurrency * rows_per_search, serve=engine.lm.serve, check=check)
    return rows


def anchored_expand(tree, node_ids, width, policy, sandbox, cfg, temperature=None, seed=None, unique=True):
    """search_svc.expand.expand with each node's greedy next step among its `width` children."""
    from search_svc.expand import expand
    greedy = expand(tree, node_ids, 1, policy, sandbox, cfg, temperature=0.0, seed=seed, unique=unique)
    sampled = expand(tree, node_ids, width - 1, policy, sandbox, cfg, temperature=temperature, seed=seed,
                     unique=unique)
    return [g + s for g, s in zip(greedy, sampled)]


def weighted_vote(answers) -> float | None:
    """Expected correctness of a value-weighted vote over one tree's (value, correct, answer text):
    each answer text scores SBS's `vote_score` of its members' values; tied top groups are a random
    pick among them. Under a constant head it is majority vote."""
    from search_svc.beam import vote_score
    if not answers:
        return None
    values: dict[str, list[float]] = {}
    for v, _, text in answers:
        values.setdefault(text, []).append(v)
    score = {text: vote_score(vs) for text, vs in values.items()}
    top = max(score.values())
    tied = [t for t, s in score.items() if s == top]
    return mean([mean([c for _, c, t in answers if t == text]) for text in tied])


def summary(rows: dict) -> dict:
    """Accuracy, chosen depths and the selection rules over each tree's answers."""
    from alphamath.metrics import per_question
    answers = [[(a["value"], a["correct"], a["answer"]) for a in r["answers"]] for r in rows.values()]
    a1 = [a["value"] for r in rows.values() for a in r["answers"] if a["depth"] == 1]
    o1 = [v for r in rows.values() for d, v in r["opens"] if d == 1]
    distinct = [r.get("distinct_correct") for r in rows.values()]
    return {"solved": sum(r["correct"] for r in rows.values()), "n": len(rows),
            "solved_by_distinct_steps": None if None in distinct else sum(distinct),
            "chosen_depth": dict(Counter(str(r["depth"]) for r in rows.values())),
            **per_question(answers),
            "weighted_vote": mean([w for w in map(weighted_vote, answers) if w is not None]),
            "depth1_answer_value": mean(a1), "depth1_open_value": mean(o1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded model)")
    ap.add_argument("--problems", default="var/learn/heldout.jsonl")
    ap.add_argument("--out", required=True, help="JSON: every method's rows and summary")
    ap.add_argument("--b1", type=int, default=3)
    ap.add_argument("--b2", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.6, help="SBS's sampling temperature")
    ap.add_argument("--anchor", action="store_true", help="also run sbs_anchor (see above)")
    ap.add_argument("--seed", type=int, default=0, help="SBS's sampling seed")
    args = ap.parse_args(argv)

    from alphamath.data import load_problems
    from alphamath.metrics import sign_test
    from alphamath.runtime import load_engine, peak_rss_mb
    from alphamath.search_config import SearchConfig
    from search_svc import beam
    from search_svc.engine import default_checker
    from trainer_svc.learn import ZeroValue

    engine = load_engine(args.model)
    problems = load_problems(args.problems)
    check = default_checker()
    cfg = SearchConfig(beam_b1=args.b1, beam_b2=args.b2, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, seed=args.seed).validate()
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {}  # resumable: a finished method is kept
    runs = [("greedy", "greedy", engine.value), ("sbs", "sbs", engine.value), ("sbs_zero", "sbs", ZeroValue())]
    for name, method, value in runs + ([("sbs_anchor", "sbs", engine.value)] if args.anchor else []):
        if name not in res:
            t0 = time.perf_counter()
            plain, beam.expand = beam.expand, (anchored_expand if name == "sbs_anchor" else beam.expand)
            try:
                rows = run_method(engine, problems, method, value, cfg, check, args.concurrency)
            finally:
                beam.expand = plain
            res[name] = {"rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
            out.write_text(json.dumps(res))
        res[name]["summary"] = summary(res[name]["rows"])
        print(name, json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                for k, v in res[name]["summary"].items()}), f"{res[name]['seconds']} s", flush=True)
    names = list(res)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra, rb = res[a]["rows"], res[b]["rows"]
            ids = sorted(set(ra) & set(rb))
            t = sign_test([ra[k]["correct"] for k in ids], [rb[k]["correct"] for k in ids])
            print(f"{a} vs {b}: {t['a_only']} won, {t['b_only']} lost of {len(ids)}, p = {t['p_value']:.3g}")
    for a in names:
        rows = res[a]["rows"]
        if rows and all(r.get("distinct_correct") is not None for r in rows.values()):
            t = sign_test([r["correct"] for r in rows.values()], [r["distinct_correct"] for r in rows.values()])
            print(f"{a}, votes by samples vs by distinct steps (same trees): {t['a_only']} won, {t['b_only']} lost "
                  f"of {len(rows)}, p = {t['p_value']:.3g}")
    out.write_text(json.dumps(res))
    print(f"peak RSS {peak_rss_mb()} MB")


if __name__ == "__main__":
    main()
