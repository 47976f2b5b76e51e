"""The learning benchmark (`make learn`): do self-training rounds lift held-out accuracy, and does the
value head earn its place?

    python -m trainer_svc.learn [--rounds 3 --k 96 --iterations 20 --dir var/learn]

Each round is `trainer_svc.round.run_round` on fresh training problems (data/arith/train.jsonl and
the easiest GSM8K train problems shuffled, interleaved): MCTS with ground truth -> Kafka -> ingest -> train
-> gate -> promote. Around it, on two held-out sets (data/arith/dev.jsonl and the hand-written
data/handwritten/dev.jsonl, written unlike the arithmetic generator), this measures for the base
model and for every round's candidate:
  greedy        the policy alone
  sbs           SBS(B1, B2) guided by the candidate's value head
  sbs_zero      the same SBS with the head zeroed at the same checkpoint: the head's own contribution
                (after the last round; every round with --zero-head-every-round, at one more SBS
                evaluation per round)
and the value head as a PRM (alphamath.metrics.value_report): checkpoint k's head on round k+1's
fresh trees (it never trained on them; free), and each candidate's head on its round's held-out
trees. Coverage: the share of training trees with a correct path, at budgets N/2 and N (and 10,
20, 40 where N allows), from each tree's first_correct_iteration.

Resumable: report.json in --dir is rewritten after every stage, and a finished stage is skipped when
the command is run again (the database and checkpoints live in --dir too). It ends with a table and
a PNG learning curve (learning.png).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from alphamath.search_config import SBS_TEMPERATURE

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
SETS = {"arith": REPO / "data" / "arith" / "dev.jsonl", "hand": REPO / "data" / "handwritten" / "dev.jsonl"}


@dataclass
class LearnConfig:
    rounds: int = 3
    k: int = 96                    # fresh training problems per round. Sessions 30-31 (48 -> 96): the head's
                                   # refit first beat the constant on ~140 questions (round 2); 3 rounds took
                                   # 1.91 h on an AMX Xeon (s31), 2.27 h on a Zen 4 (s32); budget 2.5 h
    iterations: int = 20           # MCTS simulations per training problem
    n_children: int = 5
    max_new_tokens: int = 128      # per step, search and evaluation
    epochs: int = 1                # per round, on the base's own paths. Session 13: 1 epoch lifted greedy
                                   # 9 -> 18/100; round 2 at 2 epochs narrowed the policy (hand-written 10% -> 0%)
    b1: int = 3
    b2: int = 5
    sbs_temperature: float = SBS_TEMPERATURE  # SBS's sampling in evaluation and the gates (search_config: why)
    eval_limit: int | None = 50    # problems per held-out set (None: all, 60 each): 50 makes one
                                   # problem 2 points and keeps 3 rounds within 2.5 h on 2 cores
    concurrency: int = 8           # evaluation: SBS searches at once (x B1*B2 decode rows; greedy runs
                                   # B1*B2 times as many)
    search_concurrency: int = 16   # data generation: MCTS searches at once (16 problems, N=10: 127 s
                                   # against 172 s at 8, same tree sizes; peak RSS 2.5 vs 2.2 GB)
    zero_head_every_round: bool = False  # SBS with a zeroed head costs a full SBS evaluation; by default
                                         # it runs after the last round only (and free at the base)
    dir: str = "var/learn"
    gsm8k_train: str = str(REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl")
    arith_train: str = str(REPO / "data" / "arith" / "train.jsonl")
    seed: int = 0
    model: str | None = None       # base checkpoint dir (default: the embedded SmolLM2)
    dtype: str | None = None


THROUGHPUT_ONLY = ("concurrency", "search_concurrency")  # how many at once: the same trees up to float noise
POOL_ROUNDS = 3  # the training pool holds at least this many rounds' problems (training_pool: why)


def _settings(config: dict) -> dict:
    """What a resumed run must share with the run it continues: everything but how many problems
    run at once and how many rounds it runs (a finished run goes on with more rounds: the pool of a
    shorter run is the longer run's, up to POOL_ROUNDS)."""
    return {k: v for k, v in config.items() if k not in THROUGHPUT_ONLY + ("rounds",)}


class ZeroValue:
    """A zeroed value head: every state is worth 0 (what an untrained head says)."""

    def score(self, states):
        return [0.0] * len(states)


def training_pool(cfg: LearnConfig) -> list:
    """Arithmetic and GSM8K train problems, interleaved (one of each in turn). The GSM8K half is the
    easiest rounds * k / 2 in a seeded shuffle, so every round draws from the same difficulty and a
    round's coverage and accuracy compare with another's. Sorted easiest first, each round's
    problems were harder than the last's: session 18's coverage fell 41.7 -> 33.3% by round 3. The easiest set
    is sized for at least POOL_ROUNDS rounds, so a 1-round run's problems are a 3-round run's first round and
    the run can go on to more rounds with fresh problems."""
    import random

    from alphamath.data import easiest, load_problems
    ar = load_problems(cfg.arith_train)
    gs = easiest(load_problems(cfg.gsm8k_train), min(len(ar), -(-max(cfg.rounds, POOL_ROUNDS) * cfg.k // 2)))
    random.Random(cfg.seed).shuffle(gs)
    return [p for pair in zip(ar, gs) for p in pair]


def write_problems(problems, path: Path) -> None:
    path.write_text("".join(json.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + "\n"
                            for p in problems))


def split(outcomes: dict, ids: dict) -> dict:
    """Accuracy per held-out set from {method: {problem id: correct}}."""
    out = {}
    for name, members in ids.items():
        for method, res in outcomes.items():
            got = [res[i] for i in members if i in res]
            out[f"{name}_{method}"] = sum(got) / len(got) if got else None
    return out


def coverage(trees, budgets) -> dict:
    """Share of trees whose first correct path came within each budget."""
    firsts = [t.meta.get("first_correct_iteration") for t in trees]
    return {f"N={b}": sum(1 for f in firsts if f is not None and f <= b) / len(trees) if trees else None
            for b in budgets}


def evaluate_zero_head(engine, problems, ecfg, say) -> dict:
    """SBS with the value head zeroed, same checkpoint (policy) and settings."""
    from trainer_svc.promote import EvalConfig, evaluate
    from alphamath.runtime import Engine
    zeroed = Engine(engine.policy, ZeroValue(), engine.sandbox, engine.lm, engine.model_dir)
    cfg = EvalConfig(methods=("sbs",), search=ecfg.search, concurrency=ecfg.concurrency)
    m = evaluate(zeroed, problems, cfg, progress=lambda meth, i, n: say(f"  sbs (zero head) {i}/{n}")
                 if i % 10 == 0 or i == n else None)
    return {"sbs_zero": m["outcomes"]["sbs"]}


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    xs = [r["round"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=100)
    for ax, name in zip(axes[:2], ("arith", "hand")):
        for method, style in (("greedy", "o-"), ("sbs", "s-"), ("sbs_zero", "^--")):
            ys = [None if r["acc"].get(f"{name}_{method}") is None else 100 * r["acc"][f"{name}_{method}"]
                  for r in rows]
            ax.plot(xs, ys, style, label=method)
        ax.set(title=f"held-out {name} ({report['sets'][name]} problems)", xlabel="round (0 = base)",
               ylabel="accuracy %", xticks=xs)
        ax.legend(fontsize=8)
    ax = axes[2]
    for key, style in (("auc", "o-"), ("mse_ratio", "s-")):
        pts = [(r["round"], (r.get("value_next") or r.get("value_held") or {}).get(key)) for r in rows]
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=key)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.set(title="value head on trees it never trained on", xlabel="round (0 = base)", xticks=xs)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def paired(report: dict) -> list[dict]:
    """Which differences are more than noise: every round against round 0 (same method), and within
    a round SBS against greedy and against the zero head, over all held-out problems together. An
    exact sign test (alphamath.metrics.sign_test) sees only the problems one side solves and the
    other does not; `points` is the change in accuracy (one problem = 100 / n points)."""
    from alphamath.metrics import sign_test
    rows = report["rows"]
    base = next((r for r in rows if r["round"] == 0), None)
    out = []
    for r in rows:
        o = r["outcomes"]
        pairs = [("sbs", "greedy", o), ("sbs", "sbs_distinct", o)]  # the vote by samples against by distinct steps
        if r is not base:  # at round 0 the head is zero already: sbs_zero is sbs
            pairs = [("sbs", "sbs_zero", o)] + pairs
            if base is not None:
                pairs = [(m, m, base["outcomes"]) for m in ("greedy", "sbs", "sbs_zero")] + pairs
        for a_name, b_name, other in pairs:
            a, b = o.get(a_name), other.get(b_name)
            if not a or not b:
                continue
            ids = sorted(set(a) & set(b))
            t = sign_test([a[i] for i in ids], [b[i] for i in ids])
            out.append({"round": r["round"], "a": a_name, "b": ("round 0 " if other is not o else "") + b_name,
                        "n": len(ids), "points": 100 * (sum(a[i] for i in ids) - sum(b[i] for i in ids)) / len(ids),
                        **t})
    return out


def table(report: dict) -> str:
    def pct(v):
        return "  n/a" if v is None else f"{100 * v:5.1f}"

    def num(v):
        return "  n/a" if v is None else f"{v:5.3f}"
    head = (f"{'round':<6}{'checkpoint':<22}{'arith g':>8}{'sbs':>6}{'sbs0':>6}{'hand g':>8}{'sbs':>6}{'sbs0':>6}"
            f"{'AUC':>7}{'AUC/q':>7}{'MSE/c':>7}{'q-only':>7}{'cover':>7}  promoted")
    lines = [head]
    for r in report["rows"]:
        a, v = r["acc"], r.get("value_next") or r.get("value_held") or {}
        cov = r.get("coverage", {}).get(f"N={report['config']['iterations']}")
        lines.append(f"{r['round']:<6}{r['checkpoint'][:21]:<22}{pct(a.get('arith_greedy')):>8}{pct(a.get('arith_sbs')):>6}"
                     f"{pct(a.get('arith_sbs_zero')):>6}{pct(a.get('hand_greedy')):>8}{pct(a.get('hand_sbs')):>6}"
                     f"{pct(a.get('hand_sbs_zero')):>6}{num(v.get('auc')):>7}{num(v.get('within_auc')):>7}{num(v.get('mse_ratio')):>7}"
                     f"{num(v.get('question_ratio')):>7}"
                     f"{pct(cov):>7}  {r.get('promoted', '')}")
    lines.append("paired, all held-out problems (exact sign test, two-sided p):")
    lines += [f"  round {c['round']}: {c['a']} vs {c['b']}: {c['points']:+.1f} points "
              f"({c['a_only']} won, {c['b_only']} lost of {c['n']}), p = {c['p_value']:.3g}" for c in paired(report)]
    return "\n".join(lines)


def run(cfg: LearnConfig, say=print) -> dict:
    from alphamath.data import load_problems
    from alphamath.runtime import load_engine
    from trainer_svc.promote import EvalConfig, eval_fingerprint, evaluate, value_metrics
    from trainer_svc.registry import base_checkpoint
    from trainer_svc.round import RoundConfig, run_round
    from trainer_svc.store import Store
    from trainer_svc.train import TrainConfig

    root = Path(cfg.dir)
    root.mkdir(parents=True, exist_ok=True)
    report_path = root / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    if report.get("config") and _settings(report["config"]) != _settings(asdict(cfg)):
        raise ValueError(f"{report_path} was written with other settings; use another --dir or remove it")
    report["config"] = asdict(cfg)
    report.setdefault("rows", [])
    report.setdefault("seconds", {})

    def save():
        report_path.write_text(json.dumps(report, indent=1))

    sets = {name: load_problems(path, cfg.eval_limit) for name, path in SETS.items()}
    report["sets"] = {name: len(ps) for name, ps in sets.items()}
    ids = {name: [p.id for p in ps] for name, ps in sets.items()}
    eval_file = root / "heldout.jsonl"
    write_problems([p for ps in sets.values() for p in ps], eval_file)
    pool_file = root / "train_pool.jsonl"
    pool = training_pool(cfg)
    if cfg.rounds * cfg.k > len(pool):
        raise ValueError(f"{cfg.rounds} rounds of {cfg.k} fresh problems need {cfg.rounds * cfg.k}; the pool has {len(pool)}")
    write_problems(pool, pool_file)
    ecfg = EvalConfig(search={"beam_b1": cfg.b1, "beam_b2": cfg.b2, "max_new_tokens": cfg.max_new_tokens,
                              "temperature": cfg.sbs_temperature}, concurrency=cfg.concurrency)
    eval_problems = load_problems(eval_file)
    db_url = f"sqlite:///{(root / 'trainer.db').resolve()}"
    budgets = sorted({b for b in (10, 20, 40, cfg.iterations // 2, cfg.iterations) if 0 < b <= cfg.iterations})

    def progress(method, i, n):
        if i % 10 == 0 or i == n:
            say(f"  eval {method} {i}/{n}")

    # ---- round 0: the base model -----------------------------------------------------------------
    if not any(r["round"] == 0 for r in report["rows"]):
        t = time.perf_counter()
        say(f"round 0: evaluating the base model on {sum(report['sets'].values())} held-out problems")
        engine = load_engine(cfg.model, cfg.dtype)
        m = evaluate(engine, eval_problems, ecfg, progress=progress)
        store = Store(db_url)
        try:  # round 1's gate reuses this evaluation of its base (cached per evaluation set)
            store.set_metrics(base_checkpoint(store, cfg.model).id, {**m, "eval_set": eval_fingerprint(eval_problems, ecfg)})
        finally:
            store.close()
        outcomes = {**m["outcomes"], "sbs_zero": m["outcomes"]["sbs"]}  # the base head is zero already
        report["rows"].append({"round": 0, "checkpoint": "embedded", "promoted": "base",
                               "acc": split(outcomes, ids), "outcomes": outcomes})
        report["seconds"]["round0"] = round(time.perf_counter() - t, 1)
        save()
        del engine

    # ---- rounds -------------------------------------------------------------------------------------
    for rnd in range(1, cfg.rounds + 1):
        if any(r["round"] == rnd for r in report["rows"]):
            continue
        t = time.perf_counter()
        rcfg = RoundConfig(k=cfg.k, offset=(rnd - 1) * cfg.k, train_data=str(pool_file), eval_data=str(eval_file),
                           eval_k=len(eval_problems), iterations=cfg.iterations, n_children=cfg.n_children,
                           max_new_tokens=cfg.max_new_tokens, checkpoint_dir=str(root / "checkpoints"),
                           db_url=db_url, seed=cfg.seed + 1000 * rnd, eval=ecfg, model_dir=cfg.model, dtype=cfg.dtype,
                           search_concurrency=cfg.search_concurrency,
                           train=TrainConfig(epochs=cfg.epochs, seed=cfg.seed), eval_sets=ids)
        say(f"round {rnd}: {cfg.k} fresh problems (pool {rcfg.offset}..{rcfg.offset + cfg.k - 1}), MCTS N={cfg.iterations}")
        rep = run_round(rcfg, say=say)
        store = Store(db_url)
        try:
            trees = [tr for tr in store.trees(rep.base) if tr.question_id in
                     {p.id for p in pool[rcfg.offset:rcfg.offset + cfg.k]}]
            base_path, cand_path = store.checkpoint(rep.base).path, store.checkpoint(rep.candidate).path
        finally:
            store.close()
        # the checkpoint in force (the base of this round) never trained on this round's fresh trees
        prev = [r for r in report["rows"] if r["checkpoint"] == rep.base][-1]
        base_engine = load_engine(base_path, cfg.dtype)
        prev["value_next"] = {k: v for k, v in value_metrics(base_engine.value, trees).items()
                              if k not in ("tree_sq", "tree_const_sq")}
        del base_engine
        outcomes = dict(rep.after["outcomes"])
        if cfg.zero_head_every_round or rnd == cfg.rounds:  # the candidate is loaded only for this
            cand_engine = load_engine(cand_path, cfg.dtype)
            outcomes.update(evaluate_zero_head(cand_engine, eval_problems, ecfg, say))
            del cand_engine
        row = {"round": rnd, "checkpoint": rep.candidate, "base": rep.base, "promoted": rep.promoted,
               "gate": rep.reasons, "acc": split(outcomes, ids), "outcomes": outcomes,
               "trees": rep.trees, "examples": rep.examples, "correct_trees": rep.correct_trees,
               "trained_correct_trees": rep.trained_correct_trees,
               "coverage": coverage(trees, budgets),
               "value_held": {k: v for k, v in (rep.after.get("value") or {}).items() if k != "tree_sq"},
               "round_seconds": rep.seconds}
        report["rows"].append(row)
        report["seconds"][f"round{rnd}"] = round(time.perf_counter() - t, 1)
        save()
        say(table(report))
    report["paired"] = paired(report)
    save()
    plot(report, root / "learning.png")
    say(table(report))
    say(f"report: {report_path}; learning curve: {root / 'learning.png'}")
    return report


def main(argv=None) -> int:
    d = LearnConfig()
    ap = argparse.ArgumentParser(prog="python -m trainer_svc.learn", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in asdict(d).items():
        if isinstance(value, bool):
            ap.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=value)
            continue
        typ = type(value) if value is not None else (str if name in ("model", "dtype") else int)
        ap.add_argument("--" + name.replace("_", "-"), type=typ, default=value)
    a = ap.parse_args(argv)
    from trainer_svc.round import quiet_logging, run_cli  # loads torch: after --help
    quiet_logging()
    return run_cli(run, LearnConfig(**{k: getattr(a, k) for k in asdict(d)}))


if __name__ == "__main__":
    sys.exit(main())
