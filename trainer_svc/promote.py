"""The promotion gate: a candidate checkpoint replaces the current one only if it is not worse.

Both are evaluated on the same fixed evaluation set with ground truth:
  greedy_acc  accuracy of greedy decoding (the policy alone)
  sbs_acc     accuracy of step-level beam search (policy guided by the value head)
  value_acc   how often the value head's sign on a finished solution (> 0: "correct") agrees with
              the ground truth, over every answer node the evaluation searches produced (reported)
  value       each head on held-out data-generation trees that neither was trained on
              (alphamath.metrics.value_report: AUC, MSE against the value target, MSE of the best constant)

The gate separates signal from noise (eval sets of >= 50 problems: one problem <= 2 points):
  - an accuracy blocks promotion only when the candidate is worse by more than `threshold` AND an
    exact one-sided sign test on the paired per-problem outcomes ("is the candidate worse?") gives
    p <= alpha (0.05; alpha 1 gates on the drop alone): a
    candidate is not kept back for a difference that one or two problems explain. With named
    evaluation sets (`sets`), the same test also runs within each set;
  - the candidate's value head blocks it when its squared error on the held-out trees is
    significantly higher than the best constant predictor's or the current head's (paired
    bootstrap over trees: the lower end of the 1 - 2·alpha interval of the per-tree excess lies above
    0, a one-sided test at alpha like the sign test's). Without per-tree
    errors, an MSE ratio >= 1 alone blocks. Why a test and not the raw ratio: session 27's round 1
    (greedy 14 -> 34% on arithmetic) was kept back by a ratio of 1.038 on 17 held-out trees, a
    difference that a few trees explain.

Promotion, in this order (publish_promotion):
  1. in Kubernetes (ALPHAMATH_ROLLOUT_DEPLOYMENTS set), roll the checkpoint-serving Deployments
     (TGI/policy, value_svc) to it and wait; a failed rollout is rolled back and stops here, so
     the candidate is neither marked nor announced while the fleet serves the old model;
  2. publish the CheckpointEvent (local policy_svc / value_svc switch to it);
  3. mark it promoted in the database (it becomes the base of the next round).
Each step is idempotent, so a promotion interrupted between them is finished by the next run
(the evaluations are cached per evaluation set, the rollout of a served checkpoint is a no-op).

    python -m trainer_svc.promote [--eval-data FILE --eval-k K --threshold T --device cuda]
                                  [--sandbox-addr HOST:PORT]

is the promotion CronJob: it judges the newest candidate trained from the current checkpoint that
has no verdict yet, and exits 0 when there is none, when it is rejected and when it is promoted;
1 when the rollout failed (the candidate stays unpromoted; the next run retries it).

Code cells of the evaluation searches run on the sandbox service when --sandbox-addr (env
ALPHAMATH_SANDBOX_ADDR) is set, as in Kubernetes, where the promotion pod (no capabilities,
seccomp RuntimeDefault) can start neither gVisor nor bwrap; otherwise in a local Executor.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping, Sequence

from alphamath.search_config import SBS_TEMPERATURE, SearchConfig
from alphamath.runtime import load_engine
from trainer_svc.registry import DEFAULT_DATA, held_out_trees

log = logging.getLogger(__name__)
GATED = ("greedy_acc", "sbs_acc")
EVAL_DATA = str(DEFAULT_DATA / "gsm8k" / "dev.jsonl")  # the fixed evaluation set of rounds and this job
EVAL_K = 50        # its first K problems (>= 50: one problem is at most 2 points)
THRESHOLD = 0.0    # tolerated accuracy drop per gated metric


@dataclass
class EvalConfig:
    methods: tuple[str, ...] = ("greedy", "sbs")
    search: dict = field(default_factory=lambda: {"beam_b1": 2, "beam_b2": 3, "max_new_tokens": 192,
                                                  "temperature": SBS_TEMPERATURE})
    concurrency: int = 8   # problems searched at once (their model calls share decode batches); greedy,
                           # one row per problem, runs B1 * B2 times as many: the rows of an SBS batch

    def search_config(self) -> SearchConfig:
        return SearchConfig(**self.search).validate()


def eval_fingerprint(problems: Sequence, cfg: EvalConfig) -> str:
    """What a stored evaluation was measured on: methods, search settings, the round-0 prompt (its
    instructions and worked examples: a changed prompt must not reuse a stored base accuracy) and
    the problems."""
    from alphamath.steps import render_prompt

    h = hashlib.sha256(json.dumps({"methods": list(cfg.methods), "search": cfg.search}, sort_keys=True).encode())
    h.update(render_prompt("").encode())
    for p in problems:
        h.update(f"\x00{p.id}\x00{p.question}\x00{p.answer}".encode())
    return h.hexdigest()[:16]


def evaluate(engine, problems: Sequence, cfg: EvalConfig | None = None, check=None,
             progress: Callable[[str, int, int], None] | None = None) -> dict[str, float]:
    """Accuracy per method, each problem's outcome, and value-head accuracy of `engine`
    (alphamath.runtime.Engine) on problems."""
    from search_svc.engine import default_checker, solve_many

    cfg = cfg or EvalConfig()
    check = check or default_checker()
    scfg = cfg.search_config()
    metrics: dict = {"outcomes": {}}
    agree = judged = 0
    t0 = time.perf_counter()
    for method in cfg.methods:
        outcomes = metrics["outcomes"][method] = {}

        def done(p, tree, _secs):
            nonlocal agree, judged
            outcomes[p.id] = bool(tree.meta.get("correct"))
            if "distinct_vote_node" in tree.meta:  # SBS: what the vote by distinct steps answered, same tree
                alt = tree.meta["distinct_vote_node"]
                metrics["outcomes"].setdefault(f"{method}_distinct", {})[p.id] = alt is not None and bool(
                    check(tree.nodes[alt].answer, p.answer))
            for node in tree.nodes:
                if node.terminal_reason == "answer" and node.value is not None:
                    ok = node.correct if node.correct is not None else bool(check(node.answer, p.answer))
                    agree += (node.value > 0) == ok
                    judged += 1
            if progress:
                progress(method, len(outcomes), len(problems))
        rows = scfg.beam_b1 * scfg.beam_b2 if method == "greedy" else 1
        solve_many(problems, method, engine.policy, engine.value, engine.sandbox, scfg, done,
                   concurrency=cfg.concurrency * rows, serve=getattr(getattr(engine, "lm", None), "serve", None), check=check)
        metrics[f"{method}_acc"] = sum(outcomes.values()) / len(problems) if problems else 0.0
    metrics["value_acc"] = agree / judged if judged else 0.0
    metrics["value_judged"] = float(judged)
    metrics["eval_n"] = float(len(problems))
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
    return metrics


@dataclass
class Decision:
    promote: bool
    reasons: list[str]
    candidate: dict
    current: dict


ALPHA = 0.05


def _paired(candidate: dict, current: dict, method: str,
            ids: Collection[str] | None = None) -> tuple[list[bool], list[bool]] | None:
    """Per-problem outcomes of both on the same problems (those in `ids` if given), or None when
    either lacks them."""
    a = (candidate.get("outcomes") or {}).get(method)
    b = (current.get("outcomes") or {}).get(method)
    if not a or not b or set(a) != set(b):
        return None
    keep = sorted(i for i in a if ids is None or i in ids)
    return ([bool(a[i]) for i in keep], [bool(b[i]) for i in keep]) if keep else None


def _excess(errors: dict, other: dict, confidence: float) -> tuple[int, dict | None]:
    """Paired bootstrap of the candidate's per-tree squared error over `other`'s, on the trees both
    have: (trees compared, the interval; None where they share none)."""
    from alphamath.metrics import paired_bootstrap
    trees = sorted(set(errors) & set(other))
    if not trees:
        return 0, None
    return len(trees), paired_bootstrap([errors[q] for q in trees], [other[q] for q in trees],
                                        resamples=2000, confidence=confidence)


def value_gate(candidate: dict, current: dict, alpha: float = ALPHA) -> tuple[bool, str]:
    """Candidate head vs the constant predictor and vs the current head on the same held-out trees:
    it fails only where its per-tree squared error is significantly higher (paired bootstrap)."""
    c, b = candidate["value"], current["value"]
    if c.get("mse_ratio") is None:
        return True, "value: no held-out step to judge the head on (not gated)"
    text = (f"value: MSE {c['mse']:.4f} vs current {b.get('mse') or 0:.4f}, constant {c['constant_mse']:.4f} "
            f"(ratio {c['mse_ratio']:.3f}), AUC {c.get('auc')} vs {b.get('auc')}")
    confidence = 1 - 2 * alpha if alpha < 0.5 else 0.0
    cs = c.get("tree_sq") or {}
    n, r = _excess(cs, c.get("tree_const_sq") or {}, confidence)
    if r is None and c["mse_ratio"] >= 1.0:
        return False, (f"value: MSE {c['mse']:.4f} is no better than the constant predictor's "
                       f"{c['constant_mse']:.4f} (ratio {c['mse_ratio']:.3f}) on {c['steps']} held-out steps")
    if r is not None and r["lo"] > 0:
        return False, text + (f"; significantly worse than the constant predictor on {n} held-out "
                              f"trees ({confidence:.0%} CI of the excess [{r['lo']:.4f}, {r['hi']:.4f}])")
    if r is not None and c["mse_ratio"] >= 1.0:
        text += f"; not better than the constant, but within noise on {n} trees (CI lo {r['lo']:.4f})"
    _, r = _excess(cs, b.get("tree_sq") or {}, confidence)
    if r is not None and r["lo"] > 0:
        return False, text + f"; significantly worse than the current head ({confidence:.0%} CI of the excess [{r['lo']:.4f}, {r['hi']:.4f}])"
    return True, text + " (ok)"


def _worse(candidate: dict, current: dict, method: str, threshold: float, alpha: float,
           ids: Collection[str] | None = None) -> tuple[bool, str]:
    """Is the candidate's accuracy on `ids` (all problems if None) lower by more than `threshold`,
    and significantly so by the one-sided sign test (without per-problem outcomes: the drop alone)?"""
    paired = _paired(candidate, current, method, ids)
    if ids is None:
        a, b = candidate[f"{method}_acc"], current[f"{method}_acc"]
    elif paired is None:
        return False, "no paired outcomes"
    else:
        a, b = sum(paired[0]) / len(paired[0]), sum(paired[1]) / len(paired[1])
    worse = a < b - threshold - 1e-12
    text = f"{a:.3f} vs {b:.3f}"
    if paired is not None:
        from alphamath.metrics import sign_test
        st = sign_test(*paired)
        text += f", sign test {st['a_only']} vs {st['b_only']} problems, one-sided p = {st['p_a_worse']:.3f}"
        worse = worse and st["p_a_worse"] <= alpha
    verdict = ("significantly worse" if paired is not None else f"worse by more than {threshold:.3f}") if worse else "ok"
    return worse, f"{text} ({verdict})"


def gate(candidate: dict, current: dict, threshold: float = THRESHOLD, metrics: Sequence[str] = GATED,
         alpha: float = ALPHA, sets: Mapping[str, Collection[str]] | None = None) -> Decision:
    """Promote unless a gated accuracy is worse by more than `threshold` and significantly so (sign
    test on paired outcomes, p <= alpha; without per-problem outcomes the drop alone decides), over
    all problems or within any one of `sets` (name -> problem ids), or the value head fails
    `value_gate` (when both sides carry held-out value metrics).

    Why per set: a pooled test hides a collapse on the smaller, harder set (session 13, round 2:
    hand-written greedy 10% -> 0%, 5 lost and 0 won, p 0.031, while the pooled 100 read p 0.072)."""
    reasons, ok = [], True
    named = {name: set(ids) for name, ids in (sets or {}).items()}
    for m in metrics:
        if m not in candidate or m not in current:
            raise KeyError(f"metric {m!r} missing (candidate has {sorted(candidate)}, current {sorted(current)})")
        method = m.removesuffix("_acc")
        worse, text = _worse(candidate, current, method, threshold, alpha)
        ok &= not worse
        reasons.append(f"{m}: {text}")
        for name, ids in named.items():
            worse, text = _worse(candidate, current, method, threshold, alpha, ids)
            ok &= not worse
            reasons.append(f"{m} on {name}: {text}")
    if "value" in candidate and "value" in current:
        fine, why = value_gate(candidate, current, alpha)
        ok &= fine
        reasons.append(why)
    return Decision(ok, reasons, candidate, current)


def value_metrics(value, trees) -> dict:
    """What the gate needs of a head on held-out trees: value_report's summary plus each tree's
    mean squared error against the value target (for the paired comparison)."""
    from alphamath.metrics import mse, value_report
    from search_svc.engine import default_checker
    rep = value_report(trees, value, check=default_checker())
    tree_sq, tree_const_sq = {}, {}
    for row in rep.per_tree:
        if row["steps"]:
            pred, target = zip(*row["steps"])
            tree_sq[row["question_id"]] = mse(pred, target)
            tree_const_sq[row["question_id"]] = mse([rep.constant] * len(target), target)
    return {"trees": rep.trees, "auc": rep.auc, "auc_lo": rep.auc_lo, "auc_hi": rep.auc_hi, "mse": rep.mse,
            "constant_mse": rep.constant_mse, "mse_ratio": rep.mse_ratio, "ece": rep.ece, "steps": rep.steps, "answers": rep.answers,
            "within_auc": rep.within_auc, "best_of_n": rep.best_of_n, "random_pick": rep.random_pick,
            "majority": rep.majority, "oracle": rep.oracle, "question_ratio": rep.question_ratio, "tree_sq": tree_sq,
            "tree_const_sq": tree_const_sq}


def publish_promotion(store, checkpoint_id: str, bootstrap: str | None, topic: str | None = None,
                      rollout: bool = True, *, publisher=None, roll_out: Callable | None = None) -> list | None:
    """Roll out (in Kubernetes), then announce on the checkpoints topic, then mark promoted.

    `roll_out(checkpoint, reason=...)` defaults to trainer_svc.rollout.roll_out_from_env: it
    returns None outside Kubernetes and raises RolloutError when the rollout fails, in which case
    nothing is published or marked. `publisher` (anything with CheckpointPublisher.publish)
    replaces the Kafka publisher. Returns the rollout results (None: nothing to roll)."""
    row = store.checkpoint(checkpoint_id)
    if row is None:
        raise KeyError(f"unknown checkpoint {checkpoint_id!r}")
    results = None
    if rollout:
        if roll_out is None:
            from trainer_svc.rollout import roll_out_from_env as roll_out
        results = roll_out(checkpoint_id, reason=f"promoted round {row.round}")
        if results is not None:
            log.info("rolled out %s to %d deployments", checkpoint_id, len(results))
    numeric = {k: float(v) for k, v in (row.metrics or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if publisher is None:
        from alphamath.events import CheckpointPublisher

        with CheckpointPublisher(bootstrap, **({"topic": topic} if topic else {})) as pub:
            pub.publish(checkpoint_id, row.path, row.round, parent=row.parent, metrics=numeric)
    else:
        publisher.publish(checkpoint_id, row.path, row.round, parent=row.parent, metrics=numeric)
    store.promote(checkpoint_id)
    return results


# ---- the promotion job ------------------------------------------------------------------------
VERDICT = "gate"  # metrics key of a judged candidate: "rejected" (a promoted one is marked promoted)


@dataclass
class Promotion:
    outcome: str                  # "none" (nothing to judge) | "rejected" | "promoted"
    current: str | None
    candidate: str | None = None
    decision: Decision | None = None
    rolled_out: list | None = None


def next_candidate(store, current, candidate: str | None = None):
    """The candidate to judge: `candidate` if named, else the newest unpromoted checkpoint trained
    from `current` with no verdict yet (candidates of an older base are stale: skipped)."""
    if candidate is not None:
        row = store.checkpoint(candidate)
        if row is None:
            raise ValueError(f"unknown candidate checkpoint {candidate!r}")
        if row.promoted:
            raise ValueError(f"checkpoint {candidate!r} is already promoted")
        return row
    pending = [c for c in store.checkpoints() if not c.promoted and c.parent == current.id
               and (c.metrics or {}).get(VERDICT) is None]
    return pending[-1] if pending else None


def _metrics(store, row, fp: str, engine_factory, problems, cfg: EvalConfig, say, held=()) -> dict:
    """`row`'s metrics on the evaluation set `fp` (evaluated once and cached in the database),
    plus its value head's metrics on the held-out trees `held` (they change from round to round)."""
    cached = dict(row.metrics or {})
    engine = None
    if not (cached.get("eval_set") == fp and all(m in cached for m in GATED)):
        say(f"evaluating {row.id} on {len(problems)} problems ({', '.join(cfg.methods)})")
        engine = engine_factory(row.path)
        metrics = {**evaluate(engine, problems, cfg,
                              progress=lambda m, i, n: log.info("eval %s %s %d/%d", row.id, m, i, n)), "eval_set": fp}
        store.set_metrics(row.id, metrics)
        cached.update(metrics)
    if held:
        engine = engine or engine_factory(row.path)
        cached["value"] = value_metrics(engine.value, held)
    return cached


def promote_next(store, problems: Sequence, cfg: EvalConfig | None = None, *, threshold: float = THRESHOLD,
                 alpha: float = ALPHA,
                 engine_factory: Callable[[str], object], bootstrap: str | None = None, topic: str | None = None,
                 candidate: str | None = None, publisher=None, roll_out: Callable | None = None,
                 say: Callable[[str], None] = log.info) -> Promotion:
    """Judge the next candidate against the current checkpoint on `problems` and promote it if the
    gate passes (publish_promotion). Raises RolloutError (from roll_out) with the candidate left
    unpromoted and without a verdict, so the next run retries it."""
    cfg = cfg or EvalConfig()
    current = store.current_checkpoint()
    if current is None:
        raise ValueError("no promoted checkpoint in the database yet: run a training round first")
    cand = next_candidate(store, current, candidate)
    if cand is None:
        say(f"nothing to promote: no unjudged candidate trained from {current.id}")
        return Promotion("none", current.id)
    if not problems:
        raise ValueError("the evaluation set is empty")
    fp = eval_fingerprint(problems, cfg)
    held = held_out_trees(store, current.id, (cand.metrics or {}).get("value_holdout", 0.0))
    before = _metrics(store, current, fp, engine_factory, problems, cfg, say, held)
    after = _metrics(store, cand, fp, engine_factory, problems, cfg, say, held)
    decision = gate(after, before, threshold, alpha=alpha)
    for r in decision.reasons:
        say(f"  {r}")
    if not decision.promote:
        store.set_metrics(cand.id, {VERDICT: "rejected"})
        say(f"{cand.id} rejected: {current.id} stays in force")
        return Promotion("rejected", current.id, cand.id, decision)
    results = publish_promotion(store, cand.id, bootstrap, topic, publisher=publisher, roll_out=roll_out)
    say(f"promoted {cand.id} (round {cand.round}, parent {current.id})"
        + ("" if results is None else f"; rolled out to {', '.join(r.deployment for r in results)}"))
    return Promotion("promoted", current.id, cand.id, decision, results)


# Evaluation runs for up to hours with no request deadline: a sandbox pod being replaced (rollout,
# HPA scale-down) must be waited out, not fail the whole promotion run.
SANDBOX_RETRY = {"call_timeout_s": 60.0, "retry_budget_s": 120.0}


def connect_sandbox(addr: str):
    """(sandbox, channel): the Sandbox protocol over the sandbox service at `addr`, the gRPC client
    search_svc uses, under one long-lived CallScope (no deadline). Retry limits: SANDBOX_RETRY,
    overridden by ALPHAMATH_DEP_RETRY_BUDGET_S / ALPHAMATH_DEP_CALL_TIMEOUT_S. The caller closes
    the channel."""
    import grpc

    from alphamath.remote import CHANNEL_OPTIONS, CallScope, RemoteSandbox, RetryPolicy, Endpoint

    if not addr or ":" not in addr:
        raise ValueError(f"--sandbox-addr must be HOST:PORT, got {addr!r}")
    channel = grpc.insecure_channel(addr, options=CHANNEL_OPTIONS)
    ep = Endpoint("sandbox", addr, channel, RetryPolicy.from_env(**SANDBOX_RETRY))
    return RemoteSandbox(ep, CallScope()), channel


def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m trainer_svc.promote", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(_service="promote")
    p.add_argument("--candidate", default=None, help="judge this checkpoint id (default: the newest unjudged one)")
    p.add_argument("--eval-data", default=EVAL_DATA, help="fixed evaluation set: JSON lines {id, question, answer}")
    p.add_argument("--eval-k", type=int, default=EVAL_K, help="evaluate on the first K problems")
    p.add_argument("--threshold", type=float, default=THRESHOLD, help="tolerated accuracy drop per gated metric")
    p.add_argument("--alpha", type=float, default=ALPHA,
                   help="significance level of the paired sign test (1: gate on the drop alone)")
    p.add_argument("--methods", default=",".join(EvalConfig().methods), help="evaluation methods (comma list)")
    p.add_argument("--max-new-tokens", type=int, default=EvalConfig().search["max_new_tokens"], help="per step")
    p.add_argument("--db-url", default=None, help="SQLAlchemy URL of the trainer database")
    p.add_argument("--db-schema", default=None, help="PostgreSQL schema")
    p.add_argument("--kafka-bootstrap", default="127.0.0.1:9092",
                   help="where the CheckpointEvent goes")
    p.add_argument("--dtype", default=None, help="bf16 | fp32 (default: bf16 on CUDA or where the CPU is fast)")
    p.add_argument("--device", default="cpu", help="torch device: cpu | cuda | cuda:N")
    p.add_argument("--sandbox-addr", default=None,
                   help="HOST:PORT of the sandbox service that runs the code cells (default: a local executor)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    from alphamath.data import load_problems
    from alphamath.service import parse_config
    from trainer_svc.rollout import RolloutError
    from trainer_svc.store import Store

    a = parse_config(build_parser(), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    try:
        if a.eval_k < 1:
            raise ValueError(f"--eval-k must be >= 1, got {a.eval_k}")
        if not 0 < a.alpha <= 1:
            raise ValueError(f"--alpha must be in (0, 1], got {a.alpha}")
        cfg = EvalConfig(methods=tuple(m.strip() for m in a.methods.split(",") if m.strip()),
                         search={**EvalConfig().search, "max_new_tokens": a.max_new_tokens})
        cfg.search_config()
        problems = load_problems(a.eval_data, a.eval_k)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    channel = sandbox = None
    if a.sandbox_addr:
        try:
            sandbox, channel = connect_sandbox(a.sandbox_addr)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    store = Store(a.db_url, a.db_schema)

    def engine_factory(path: str):
        nonlocal sandbox
        engine = load_engine(path, a.dtype, a.device, sandbox)
        sandbox = engine.sandbox  # one sandbox (pool or remote) for both evaluations
        return engine
    try:
        res = promote_next(store, problems, cfg, threshold=a.threshold, alpha=a.alpha, engine_factory=engine_factory,
                           bootstrap=a.kafka_bootstrap, candidate=a.candidate, say=print)
    except RolloutError as e:
        print(f"error: rollout failed, the candidate stays unpromoted and unannounced: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError, KeyError, RuntimeError) as e:  # RuntimeError: e.g. no sandbox can start
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if sandbox is not None and hasattr(sandbox, "close"):
            sandbox.close()
        if channel is not None:
            channel.close()
        store.close()
    print(f"outcome: {res.outcome}" + (f" ({res.candidate})" if res.candidate else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
