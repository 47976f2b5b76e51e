"""The promotion gate: a candidate checkpoint replaces the current one only if it is not worse.

Both are evaluated on the same fixed evaluation set with ground truth:
  greedy_acc  accuracy of greedy decoding (the policy alone)
  sbs_acc     accuracy of step-level beam search (policy guided by the value head)
  value_acc   how often the value head's sign on a finished solution (> 0: "correct") agrees with
              the ground truth, over every answer node the evaluation searches produced
The candidate is promoted when each gated metric is >= current - threshold. Promotion records it
in the database, publishes a CheckpointEvent (policy_svc / value_svc switch to it) and, in
Kubernetes (ALPHAMATH_ROLLOUT_DEPLOYMENTS set), rolls the TGI/value deployments.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from search_svc.config import SearchConfig

log = logging.getLogger(__name__)
GATED = ("greedy_acc", "sbs_acc")


@dataclass
class EvalConfig:
    methods: tuple[str, ...] = ("greedy", "sbs")
    search: dict = field(default_factory=lambda: {"beam_b1": 2, "beam_b2": 3, "max_new_tokens": 192})

    def search_config(self) -> SearchConfig:
        return SearchConfig(**self.search).validate()


def eval_fingerprint(problems: Sequence, cfg: EvalConfig) -> str:
    h = hashlib.sha256(json.dumps({"methods": list(cfg.methods), "search": cfg.search}, sort_keys=True).encode())
    for p in problems:
        h.update(f"\x00{p.id}\x00{p.question}\x00{p.answer}".encode())
    return h.hexdigest()[:16]


def evaluate(engine, problems: Sequence, cfg: EvalConfig | None = None, check=None,
             progress: Callable[[str, int, int], None] | None = None) -> dict[str, float]:
    """Accuracy per method and value-head accuracy of `engine` (alphamath.runtime.Engine) on problems."""
    from search_svc.engine import default_checker, solve

    cfg = cfg or EvalConfig()
    check = check or default_checker()
    scfg = cfg.search_config()
    metrics: dict[str, float] = {}
    agree = judged = 0
    t0 = time.perf_counter()
    for method in cfg.methods:
        correct = 0
        for i, p in enumerate(problems):
            tree = solve(p.question, method, engine.policy, engine.value, engine.sandbox, scfg,
                         ground_truth=p.answer, question_id=p.id, check=check)
            correct += bool(tree.meta.get("correct"))
            for node in tree.nodes:
                if node.terminal_reason == "answer" and node.value is not None:
                    ok = node.correct if node.correct is not None else bool(check(node.answer, p.answer))
                    agree += (node.value > 0) == ok
                    judged += 1
            if progress:
                progress(method, i + 1, len(problems))
        metrics[f"{method}_acc"] = correct / len(problems) if problems else 0.0
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


def gate(candidate: dict, current: dict, threshold: float = 0.0, metrics: Sequence[str] = GATED) -> Decision:
    """Promote iff every gated metric of the candidate is >= the current one's minus `threshold`."""
    reasons, ok = [], True
    for m in metrics:
        if m not in candidate or m not in current:
            raise KeyError(f"metric {m!r} missing (candidate has {sorted(candidate)}, current {sorted(current)})")
        fine = candidate[m] >= current[m] - threshold - 1e-12
        ok &= fine
        reasons.append(f"{m}: {candidate[m]:.3f} vs {current[m]:.3f} "
                       f"({'ok' if fine else f'worse by more than {threshold:.3f}'})")
    return Decision(ok, reasons, candidate, current)


def publish_promotion(store, checkpoint_id: str, bootstrap: str | None, topic: str | None = None,
                      rollout: bool = True) -> None:
    """Mark promoted, announce on the checkpoints topic, and roll Kubernetes deployments if configured."""
    from alphamath.events import CheckpointPublisher

    row = store.checkpoint(checkpoint_id)
    if row is None:
        raise KeyError(f"unknown checkpoint {checkpoint_id!r}")
    store.promote(checkpoint_id)
    numeric = {k: float(v) for k, v in (row.metrics or {}).items() if isinstance(v, (int, float))}
    kw = {"topic": topic} if topic else {}
    with CheckpointPublisher(bootstrap, **kw) as pub:
        pub.publish(checkpoint_id, row.path, row.round, parent=row.parent, metrics=numeric)
    if rollout:
        from trainer_svc.rollout import roll_out_from_env

        results = roll_out_from_env(checkpoint_id, reason=f"promoted round {row.round}")
        if results is not None:
            log.info("rolled out %s to %d deployments", checkpoint_id, len(results))
