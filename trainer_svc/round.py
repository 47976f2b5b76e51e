"""One self-training round, end to end through the event pipeline (`make round`).

  1. GenerateTrees: MCTS with ground truth on K training problems with the current checkpoint;
     every finished tree is published to alphamath.trees.v1 (acks=all) as search_svc does.
  2. Ingest: the trainer's consumer group stores the trees and their examples (idempotent).
  3. Train: joint policy/value training on this round's examples -> a candidate checkpoint.
  4. Evaluate and gate: greedy/SBS/value accuracy of current vs candidate on a fixed eval set.
  5. Promote: record, publish the CheckpointEvent; services reload (here an in-process ModelSlot
     listening on the topic proves the event arrives; policy_svc/value_svc do the same).
Prints the accuracy table before and after.

    python -m trainer_svc.round --k 8 --iterations 10 --epochs 1 [--eval-k 8] [--model DIR]

`run_round(RoundConfig(...))` is the programmatic entry point (the learning benchmark calls it
repeatedly; each call continues from the latest promoted checkpoint in the database).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import select

from alphamath.broker import CHECKPOINTS_TOPIC, TREES_TOPIC, DLQ_TOPIC
from trainer_svc.ingest import Ingestor
from trainer_svc.promote import (ALPHA, EVAL_DATA, EVAL_K, THRESHOLD, EvalConfig, eval_fingerprint, evaluate,
                                 gate, publish_promotion, value_metrics)
from trainer_svc.registry import DEFAULT_DATA, base_checkpoint, checkpoint_root, held_out_trees
from trainer_svc.store import Store, TreeRow
from trainer_svc.train import TrainConfig, train_next_round

log = logging.getLogger(__name__)


@dataclass
class RoundConfig:
    k: int = 8                               # training problems searched (GenerateTrees)
    offset: int = 0                          # first training problem (rounds may use fresh ones)
    train_data: str = str(DEFAULT_DATA / "gsm8k" / "train.jsonl")
    eval_data: str = EVAL_DATA               # fixed evaluation set: the first eval_k problems (>= 50:
    eval_k: int = EVAL_K                     # one problem is at most 2 points)
    iterations: int = 10                     # MCTS simulations per training problem
    n_children: int = 5                      # as in the paper
    max_new_tokens: int = 192
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    threshold: float = THRESHOLD             # tolerated accuracy drop per gated metric
    alpha: float = ALPHA                     # significance of the gate's paired sign test
    eval_sets: dict | None = None            # name -> problem ids: the gate also tests within each set
    ingest_timeout_s: float = 120.0          # how long the round waits for its own trees in the store
    search_concurrency: int | None = None    # questions searched at once in GenerateTrees (None: eval's).
                                             # MCTS expands one leaf of n samples per call, so its decode
                                             # batches are thin: 16 at once ran 1.35x the throughput of 8
    model_dir: str | None = None             # base when the DB has no promoted checkpoint (default: embedded)
    checkpoint_dir: str | None = None        # where candidates are written
    bootstrap: str | None = None             # Kafka; None starts a local tansu broker for the round
    db_url: str | None = None
    db_schema: str | None = None
    topics: dict = field(default_factory=lambda: {"trees": TREES_TOPIC, "checkpoints": CHECKPOINTS_TOPIC,
                                                  "dlq": DLQ_TOPIC})
    dtype: str | None = None
    seed: int = 0
    reload_timeout_s: float = 120.0


@dataclass
class RoundReport:
    round: int
    base: str
    candidate: str | None
    promoted: bool
    before: dict
    after: dict
    reasons: list[str]
    trees: int
    examples: int
    correct_trees: int
    trained_correct_trees: int  # those with a correct path the examples keep (see examples.py)
    reloaded: bool
    seconds: dict

    def table(self) -> str:
        keys = [k for k in ("greedy_acc", "sbs_acc", "value_acc") if k in self.before or k in self.after]
        lines = [f"{'metric':<12} {'before':>8} {'after':>8}   ({self.base} -> {self.candidate})"]
        for k in keys:
            b, a = self.before.get(k), self.after.get(k)
            lines.append(f"{k:<12} {b if b is None else format(b, '8.1%'):>8} "
                         f"{a if a is None else format(a, '8.1%'):>8}")
        vb, va = self.before.get("value") or {}, self.after.get("value") or {}
        for k in ("auc", "mse_ratio"):
            b, a = vb.get(k), va.get(k)
            if a is not None or b is not None:
                ci = ""  # the held-out trees are few: say how far the AUC can move
                if k == "auc" and va.get("auc_lo") is not None:
                    ci = f"   (after: 95% interval {va['auc_lo']:.3f}-{va['auc_hi']:.3f}, {va['trees']} trees)"
                lines.append(f"{'value ' + k:<12} {'n/a' if b is None else format(b, '.3f'):>8} "
                             f"{'n/a' if a is None else format(a, '.3f'):>8}{ci}")
        verdict = "PROMOTED" if self.promoted else "kept the current checkpoint"
        lines.append(f"round {self.round}: {self.trees} trees ({self.correct_trees} with a correct path, "
                     f"{self.trained_correct_trees} of them kept for training), "
                     f"{self.examples} examples; {verdict}")
        lines += [f"  {r}" for r in self.reasons]
        lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def stored_question_ids(store, checkpoint: str) -> set[str]:
    """Question ids of the trees stored for `checkpoint`."""
    with store.session() as s:
        return set(s.scalars(select(TreeRow.question_id).where(TreeRow.checkpoint == checkpoint)))


def wait_for_trees(store, ingestor, checkpoint: str, question_ids: set[str], timeout_s: float) -> None:
    """Poll the trees topic until the store holds a tree of `checkpoint` for every one of this
    round's questions; raise naming the missing ones. Counting trees is not enough: an earlier
    round of the same checkpoint (one whose candidate was kept back) already reached any count."""
    deadline = time.monotonic() + timeout_s
    missing = question_ids - stored_question_ids(store, checkpoint)
    while missing and time.monotonic() < deadline:
        ingestor.poll_once(500)
        missing = question_ids - stored_question_ids(store, checkpoint)
    if missing:
        raise RuntimeError(f"{len(missing)} of this round's {len(question_ids)} trees for checkpoint {checkpoint} "
                           f"did not reach the store within {timeout_s:.0f}s: {', '.join(sorted(missing)[:10])}")


def _default_engine(model_dir: str, dtype: str | None):
    from alphamath.runtime import load_engine
    return load_engine(model_dir, dtype=dtype)


def run_round(cfg: RoundConfig | None = None, engine_factory: Callable[[str, str | None], object] | None = None,
              say: Callable[[str], None] = print) -> RoundReport:
    from alphamath.data import load_problems
    from alphamath.events import CheckpointListener, TreePublisher
    from alphamath.slot import Loaded, ModelSlot
    from alphamath.search_config import SearchConfig
    from search_svc.engine import solve_many

    cfg = cfg or RoundConfig()
    make_engine = engine_factory or _default_engine
    secs: dict[str, float] = {}

    def eval_progress(method: str, i: int, n: int) -> None:
        say(f"  eval {method} {i}/{n}")
    broker = None
    if cfg.bootstrap is None:
        from alphamath.broker import start_broker
        broker = start_broker(topics={cfg.topics["trees"]: 2, cfg.topics["checkpoints"]: 1, cfg.topics["dlq"]: 1})
        say(f"started a local tansu broker on {broker.bootstrap}")
    else:
        from alphamath.broker import create_topics
        create_topics(cfg.bootstrap, {cfg.topics["trees"]: 2, cfg.topics["checkpoints"]: 1, cfg.topics["dlq"]: 1})
    bootstrap = cfg.bootstrap or broker.bootstrap
    store = Store(cfg.db_url, cfg.db_schema)
    listener = None
    try:
        # ---- the checkpoint in force ------------------------------------------------------------
        current = base_checkpoint(store, cfg.model_dir)
        rnd = current.round + 1
        train_problems = load_problems(cfg.train_data, cfg.offset + cfg.k)[cfg.offset:]
        eval_problems = load_problems(cfg.eval_data, cfg.eval_k)
        say(f"round {rnd}: base {current.id} ({current.path}); {len(train_problems)} training problems, "
            f"{len(eval_problems)} eval problems")
        if len(eval_problems) < 50:
            say(f"  note: with {len(eval_problems)} eval problems one problem is {100 / len(eval_problems):.1f} "
                "points; the gate's sign test will rarely call a difference significant")
        t = time.perf_counter()
        engine = make_engine(current.path, cfg.dtype)
        secs["load"] = time.perf_counter() - t

        # services: a slot following the checkpoints topic, as policy_svc/value_svc do
        slot = ModelSlot(Loaded(getattr(engine, "lm", engine), current.id, current.path))
        reload = slot.follow(lambda path, ckpt: Loaded(getattr(make_engine(path, cfg.dtype), "lm", None), ckpt, path))
        listener = CheckpointListener(bootstrap, f"round-{uuid.uuid4().hex[:8]}", reload,
                                      topic=cfg.topics["checkpoints"]).start()

        # ---- before: the current checkpoint on the eval set (cached per eval set) ----------------
        fp = eval_fingerprint(eval_problems, cfg.eval)
        before = dict(current.metrics or {})
        if before.get("eval_set") != fp:
            t = time.perf_counter()
            say(f"evaluating {current.id} on {len(eval_problems)} problems ({', '.join(cfg.eval.methods)})")
            before = {**evaluate(engine, eval_problems, cfg.eval, progress=eval_progress), "eval_set": fp}
            store.set_metrics(current.id, before)
            secs["eval_before"] = time.perf_counter() - t

        # ---- 1. GenerateTrees -> Kafka (only the trees the store does not hold yet: a round run
        #      again after an interruption resumes, and a problem searched already is not redone) ----
        scfg = SearchConfig(iterations=cfg.iterations, n_children=cfg.n_children,
                            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + rnd).validate()
        stored = stored_question_ids(store, current.id)
        todo = [p for p in train_problems if p.id not in stored]
        if len(todo) < len(train_problems):
            say(f"  {len(train_problems) - len(todo)} of this round's trees are stored already for {current.id}; "
                f"searching the other {len(todo)}")
        t, built = time.perf_counter(), 0
        with TreePublisher(bootstrap, topic=cfg.topics["trees"]) as pub:
            def publish(p, tree, _secs):
                nonlocal built
                tree.meta["checkpoint"] = current.id
                pub.publish(tree, current.id, scfg.to_dict())
                built += 1
                say(f"  tree {built}/{len(todo)} {p.id}: {len(tree.nodes) - 1} steps, "
                    f"answer {tree.meta.get('answer')!r} ({'correct' if tree.meta.get('correct') else 'wrong'})")
            if todo:
                solve_many(todo, "mcts", engine.policy, engine.value, engine.sandbox, scfg, publish,
                           concurrency=cfg.search_concurrency or cfg.eval.concurrency,
                           serve=getattr(getattr(engine, "lm", None), "serve", None), rewards=True)
        secs["generate"] = time.perf_counter() - t

        # ---- 2. ingest -----------------------------------------------------------------------------
        t, ids = time.perf_counter(), {p.id for p in train_problems}
        with Ingestor(store, bootstrap, topic=cfg.topics["trees"], dlq_topic=cfg.topics["dlq"]) as ing:
            wait_for_trees(store, ing, current.id, ids, cfg.ingest_timeout_s)
        counts = store.counts(current.id)
        correct_trees = sum(1 for tr in store.trees(current.id)
                            if tr.question_id in ids and any(n.correct for n in tr.nodes))
        # Fewer: a path whose every code step failed is dropped even when its answer is right.
        trained_correct_trees = len({e.question_id for e in store.examples(current.id)
                                     if e.correct and e.question_id in ids})
        secs["ingest"] = time.perf_counter() - t
        say(f"ingested: {counts['trees']} trees, {counts['examples']} examples "
            f"({counts['correct_examples']} correct paths) for checkpoint {current.id}")

        # ---- 3. train ------------------------------------------------------------------------------
        t = time.perf_counter()

        def progress(p):
            say(f"  train step {p.step}/{p.total_steps}: loss {p.loss:.4f} (lm {p.lm_loss:.4f}, "
                f"value {p.value_loss:.4f})")
        cand = train_next_round(store, cfg.checkpoint_dir or checkpoint_root(), cfg.train, base=current, rnd=rnd,
                                on_progress=progress)
        cand_id, out_dir, n_examples = cand.id, cand.path, cand.examples
        secs["train"] = time.perf_counter() - t

        # ---- 4. evaluate and gate ------------------------------------------------------------------
        t = time.perf_counter()
        cand_engine = make_engine(str(out_dir), cfg.dtype)
        after = dict(store.checkpoint(cand_id).metrics or {})
        if after.get("eval_set") != fp:  # else: evaluated on this set before the round was interrupted
            say(f"evaluating {cand_id} on {len(eval_problems)} problems")
            after = {**evaluate(cand_engine, eval_problems, cfg.eval, progress=eval_progress), "eval_set": fp}
            store.set_metrics(cand_id, after)
        held = held_out_trees(store, current.id, cfg.train.value_holdout)
        if held:  # both heads on the trees the candidate was not trained on
            say(f"value heads on {len(held)} held-out trees")
            before = {**before, "value": value_metrics(engine.value, held)}
            after = {**after, "value": value_metrics(cand_engine.value, held)}
        secs["eval_after"] = time.perf_counter() - t
        decision = gate(after, before, cfg.threshold, alpha=cfg.alpha, sets=cfg.eval_sets)

        # ---- 5. promote and reload -----------------------------------------------------------------
        reloaded = False
        if decision.promote:
            publish_promotion(store, cand_id, bootstrap, topic=cfg.topics["checkpoints"])
            t = time.perf_counter()
            deadline = time.monotonic() + cfg.reload_timeout_s
            while slot.checkpoint != cand_id and time.monotonic() < deadline:
                time.sleep(0.1)
            reloaded = slot.checkpoint == cand_id
            secs["reload"] = time.perf_counter() - t
            say(f"services reloaded: serving {slot.checkpoint}" if reloaded
                else f"WARNING: the listener did not switch to {cand_id} within {cfg.reload_timeout_s}s")
        report = RoundReport(rnd, current.id, cand_id, decision.promote, before, after, decision.reasons,
                             counts["trees"], n_examples, correct_trees, trained_correct_trees, reloaded, secs)
        say(report.table())
        return report
    finally:
        if listener is not None:
            listener.stop()
        store.close()
        if broker is not None:
            broker.stop()


def quiet_logging() -> None:
    """Logging of the round and learning CLIs: warnings and up; kafka's event-loop timing warnings
    are noise here."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)


def run_cli(run: Callable, cfg) -> int:
    """`run(cfg)` as the round and learning CLIs end: 0, or 1 with the error on stderr.

    SIGTERM (kill, a Job's deletion) unwinds like Ctrl-C, as SystemExit(143), so the `finally`
    blocks run and the tansu broker a round started is stopped, not orphaned."""
    import signal
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        run(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_svc.round", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = RoundConfig()
    p.add_argument("--k", type=int, default=d.k, help="training problems searched")
    p.add_argument("--offset", type=int, default=d.offset)
    p.add_argument("--iterations", type=int, default=d.iterations, help="MCTS simulations per problem")
    p.add_argument("--n-children", type=int, default=d.n_children)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="per step, search and eval")
    p.add_argument("--epochs", type=int, default=d.train.epochs)
    p.add_argument("--lr", type=float, default=d.train.learning_rate)
    p.add_argument("--batch-size", type=int, default=d.train.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.train.grad_accum)
    p.add_argument("--eval-k", type=int, default=d.eval_k)
    p.add_argument("--train-data", default=d.train_data)
    p.add_argument("--eval-data", default=d.eval_data)
    p.add_argument("--threshold", type=float, default=d.threshold, help="tolerated accuracy drop per gated metric")
    p.add_argument("--alpha", type=float, default=d.alpha, help="significance of the gate's paired sign test")
    p.add_argument("--value-head-lr", type=float, default=d.train.value_head_lr)
    p.add_argument("--value-holdout", type=float, default=d.train.value_holdout,
                   help="share of questions kept out of training to judge value heads on")
    p.add_argument("--model", default=None, help="base checkpoint when none is promoted yet (default: embedded)")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--bootstrap", default=os.environ.get("ALPHAMATH_KAFKA_BOOTSTRAP"),
                   help="Kafka bootstrap (default: 127.0.0.1:9092 if a broker listens there, "
                        "else a tansu broker started for this round)")
    p.add_argument("--db-url", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    quiet_logging()
    if a.bootstrap is None:
        from alphamath.broker import DEFAULT_BOOTSTRAP, port_open
        host, port = DEFAULT_BOOTSTRAP.split(":")
        if port_open(host, int(port)):  # the local stack (`make run`) is up: its services must get the event
            a.bootstrap = DEFAULT_BOOTSTRAP
    cfg = RoundConfig(k=a.k, offset=a.offset, iterations=a.iterations, n_children=a.n_children,
                      max_new_tokens=a.max_new_tokens, eval_k=a.eval_k, train_data=a.train_data,
                      eval_data=a.eval_data, threshold=a.threshold, alpha=a.alpha, model_dir=a.model,
                      checkpoint_dir=a.checkpoint_dir, bootstrap=a.bootstrap, db_url=a.db_url, dtype=a.dtype,
                      seed=a.seed,
                      eval=EvalConfig(search={**EvalConfig().search, "max_new_tokens": a.max_new_tokens}),
                      train=TrainConfig(epochs=a.epochs, learning_rate=a.lr, batch_size=a.batch_size,
                                        grad_accum=a.grad_accum, seed=a.seed, value_head_lr=a.value_head_lr,
                                        value_holdout=a.value_holdout))
    return run_cli(run_round, cfg)


if __name__ == "__main__":
    sys.exit(_main())
