"""Joint policy/value training of one round (AlphaMath's self-training step).

Loss: trainer_svc.loss.joint_loss (LM cross-entropy on correct paths + alpha * MSE of the value
head against each step's Q). AdamW, linear warm-up then cosine decay, gradient accumulation,
gradient clipping. Master weights stay fp32; where the compute dtype is bf16 (CPUs with native
bf16, see alphamath.model.default_dtype, or ALPHAMATH_DTYPE=bf16) the forward runs under
torch.autocast(bf16).

Resumable: every `save_every` optimizer steps the model, optimizer, scheduler and step are saved
atomically to `<output_dir>.state/`; a run started again with the same output dir, examples and
config continues from there and ends with the same weights as an uninterrupted run. The finished
checkpoint (HF dir + value_head.safetensors) appears at `output_dir` in one rename.

`train_next_round` is one round's training as the trainer runs it (the Kubernetes training Job,
TrainerService.StartTraining, `make round`): the checkpoint in force (trainer_svc.registry) is trained
on the examples of the trees it built, and the result is recorded in the database as an unpromoted
candidate (the promotion gate, trainer_svc.promote, decides whether it replaces the current one).

    python -m trainer_svc.train                      # the Job: ALPHAMATH_DB_URL, ALPHAMATH_CHECKPOINT_DIR
    python -m trainer_svc.train --base DIR --examples FILE.jsonl --out DIR    # offline, no database
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from trainer_svc.examples import Example, cap_per_question, held_out
from trainer_svc.faults import fault_point
from trainer_svc.registry import base_checkpoint, candidate_id, checkpoint_root, lineage_trees

if TYPE_CHECKING:
    from trainer_svc.store import CheckpointRow, Store

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
DONE_FILE = "training.json"


@dataclass
class TrainConfig:
    epochs: int = 1
    learning_rate: float = 2e-5     # the trunk and LM head
    value_head_lr: float = 1e-3     # the value head: a fresh linear layer needs far larger steps than
                                    # the pre-trained trunk (at 2e-5 it barely left zero in a round)
    batch_size: int = 4
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    value_loss_weight: float = 0.1  # alpha
    value_balance: bool = False     # weigh correct paths' step ends by n_wrong / n_correct in the value
                                    # loss, so the few correct answers count as much as the many wrong
    max_grad_norm: float = 1.0
    fit_value_head: bool = True     # after the joint steps, refit the head to convergence on the final
                                    # trunk's features (trainer_svc.head_fit: why)
    max_len: int = 1024             # tokens per example
    max_examples: int | None = None
    value_holdout: float = 0.25     # share of questions (by id hash) whose trees are kept out of
                                    # training: the promotion gate judges value heads on them
    value_generations: int = 3      # the head is refit on the trees of the base and its ancestors,
                                    # this many checkpoints in all (registry.lineage_trees: why)
    seed: int = 0
    save_every: int = 50            # optimizer steps between resumable states
    dtype: str | None = None        # compute dtype for autocast; None: alphamath.model.default_dtype()

    def validate(self) -> "TrainConfig":
        checks = [(self.epochs >= 1, "epochs must be >= 1"), (self.learning_rate > 0, "learning_rate must be > 0"),
                  (self.value_head_lr > 0, "value_head_lr must be > 0"),
                  (0 <= self.value_holdout < 1, "value_holdout must be in [0, 1)"),
                  (self.batch_size >= 1, "batch_size must be >= 1"), (self.grad_accum >= 1, "grad_accum must be >= 1"),
                  (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
                  (self.value_loss_weight >= 0, "value_loss_weight must be >= 0"),
                  (self.max_len >= 8, "max_len must be >= 8"), (self.save_every >= 1, "save_every must be >= 1"),
                  (self.max_examples is None or self.max_examples >= 1, "max_examples must be >= 1"),
                  (self.value_generations >= 1, "value_generations must be >= 1")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        return self


@dataclass
class Progress:
    step: int
    total_steps: int
    loss: float
    lm_loss: float
    value_loss: float
    lr: float
    seconds: float


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    examples: int
    loss: float | None
    lm_loss: float | None
    value_loss: float | None
    seconds: float
    resumed_from: int = 0
    history: list[dict] = field(default_factory=list)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to 0 at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def plan(n_examples: int, cfg: TrainConfig) -> list[list[list[int]]]:
    """Optimizer steps -> micro-batches -> example indices, reproducible from cfg.seed."""
    steps = []
    for epoch in range(cfg.epochs):
        order = list(range(n_examples))
        random.Random(cfg.seed * 1009 + epoch).shuffle(order)
        micro = [order[i:i + cfg.batch_size] for i in range(0, n_examples, cfg.batch_size)]
        steps += [micro[i:i + cfg.grad_accum] for i in range(0, len(micro), cfg.grad_accum)]
    return steps


def fingerprint(base_dir: Path, examples: Sequence[Example], cfg: TrainConfig) -> str:
    """What a saved state must match to be resumed (same base, data and hyper-parameters)."""
    h = hashlib.sha256(str(Path(base_dir).resolve()).encode())
    h.update(json.dumps({k: v for k, v in asdict(cfg).items() if k != "save_every"}, sort_keys=True).encode())
    for e in examples:
        h.update(e.key.encode() + (b"1" if e.correct else b"0") + json.dumps(e.values).encode())
    return h.hexdigest()


def _autocast(dtype: torch.dtype, device: torch.device):
    if dtype == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _save_state(state_dir: Path, model, optimizer, scheduler, step: int, fp: str, history: list) -> None:
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "fingerprint": fp, "history": history}, tmp / STATE_FILE)
    old = state_dir.with_name(state_dir.name + ".old")
    if state_dir.exists():
        os.replace(state_dir, old)
    os.replace(tmp, state_dir)
    shutil.rmtree(old, ignore_errors=True)


def train(base_dir: str | Path, examples: Sequence[Example], output_dir: str | Path,
          cfg: TrainConfig | None = None, on_progress: Callable[[Progress], None] | None = None,
          device: str | torch.device = "cpu", value_examples: Sequence[Example] | None = None) -> TrainResult:
    """Train `base_dir` on `examples` on `device`; write the checkpoint to `output_dir` (resuming if
    interrupted; a saved state resumes on any device). `value_examples`: the paths the head is
    refit on (default: `examples`); every finished path of the trees keeps the head calibrated to
    the states search meets, where the 4 + 4 cap over-represents correct paths."""
    from alphamath.model import ValueHeadModel, default_dtype
    from trainer_svc.loss import collate, joint_loss, policy_value_pass

    cfg = (cfg or TrainConfig()).validate()
    base_dir, output_dir = Path(base_dir), Path(output_dir)
    examples = list(examples)[: cfg.max_examples] if cfg.max_examples else list(examples)
    if not examples:
        raise ValueError("no training examples (did the trees contain finished paths with ground truth?)")
    done_file = output_dir / DONE_FILE
    if done_file.is_file():
        info = json.loads(done_file.read_text())
        log.info("%s is already trained (%d steps); nothing to do", output_dir, info["steps"])
        return TrainResult(output_dir, info["steps"], info["examples"], info.get("loss"), info.get("lm_loss"),
                           info.get("value_loss"), 0.0, info["steps"], info.get("history", []))
    state_dir = output_dir.with_name(output_dir.name + ".state")
    fp = fingerprint(base_dir, examples, cfg)
    device = torch.device(device)
    compute_dtype = default_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)

    start_step, history, load_from = 0, [], base_dir
    saved = state_dir / STATE_FILE
    state = torch.load(saved, weights_only=False, map_location="cpu") if saved.is_file() else None
    if state is not None and state["fingerprint"] != fp:
        log.warning("ignoring saved state in %s: it belongs to other data/config", state_dir)
        state = None
    if state is not None:
        load_from, start_step, history = state_dir, state["step"], state["history"]
    model = ValueHeadModel.from_pretrained(load_from, dtype=torch.float32, device=device)  # fp32 master weights
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError(f"{base_dir} has no tokenizer")
    model.train()
    steps = plan(len(examples), cfg)
    total = len(steps)
    warmup = int(round(cfg.warmup_ratio * total))
    trunk = [(n, p) for n, p in model.named_parameters() if not n.startswith("value_head.")]
    optimizer = torch.optim.AdamW([
        {"params": [p for _, p in trunk if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in trunk if p.ndim < 2], "weight_decay": 0.0},
        {"params": list(model.value_head.parameters()), "weight_decay": 0.0, "lr": cfg.value_head_lr},
    ], lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        log.info("resuming %s at step %d/%d", output_dir, start_step, total)

    weights = value_weights(examples, cfg.value_balance)
    t0 = time.perf_counter()
    last: Progress | None = None
    for step in range(start_step, total):
        micro = steps[step]
        sums = torch.zeros(3)
        optimizer.zero_grad(set_to_none=True)
        for idx in micro:
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], tokenizer, cfg.max_len,
                                                         [weights[i] for i in idx]).items()}
            if not batch["value_mask"].any():
                log.warning("step %d: no step end within max_len=%d tokens in this batch; raise max_len",
                            step + 1, cfg.max_len)
            with _autocast(compute_dtype, device):
                jl = joint_loss(*policy_value_pass(model, batch), batch, alpha=cfg.value_loss_weight)
            (jl.loss / len(micro)).backward()
            sums += torch.tensor([jl.loss.item(), jl.lm_loss.item(), jl.value_loss.item()]) / len(micro)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        last = Progress(step + 1, total, *(float(x) for x in sums), lr, time.perf_counter() - t0)
        history.append({"step": last.step, "loss": last.loss, "lm_loss": last.lm_loss,
                        "value_loss": last.value_loss, "lr": lr})
        log.info("step %d/%d loss %.4f (lm %.4f, value %.4f) lr %.2e", last.step, total, last.loss,
                 last.lm_loss, last.value_loss, lr)
        if on_progress:
            on_progress(last)
        if last.step % cfg.save_every == 0 and last.step < total:
            _save_state(state_dir, model, optimizer, scheduler, last.step, fp, history)
            fault_point("after_state_save")

    model.eval()
    value_fit = None
    if cfg.fit_value_head:
        fit_on = list(value_examples) if value_examples else examples
        value_fit = refit_value_head(model, fit_on, value_weights(fit_on, cfg.value_balance), compute_dtype)
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, tokenizer)
    final = history[-1] if history else {}
    info = {"steps": total, "examples": len(examples), "base": str(base_dir), "config": asdict(cfg),
            "loss": final.get("loss"), "lm_loss": final.get("lm_loss"), "value_loss": final.get("value_loss"),
            "history": history, "value_fit": value_fit}
    (tmp / DONE_FILE).write_text(json.dumps(info, indent=1))
    if output_dir.exists():
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)
    shutil.rmtree(state_dir, ignore_errors=True)
    return TrainResult(output_dir, total, len(examples), final.get("loss"), final.get("lm_loss"),
                       final.get("value_loss"), time.perf_counter() - t0, start_step, history)


def refit_value_head(model, examples: Sequence[Example], weights: Sequence[float], compute_dtype: torch.dtype) -> dict:
    """Replace the jointly trained head by one fit to convergence on the trained trunk's features
    as the serving engine computes them in the compute dtype (trainer_svc.head_fit), its L2
    strength chosen by cross-validation over questions."""
    from trainer_svc.head_fit import refit

    t0 = time.perf_counter()
    info = refit(model, examples, weights, dtype=compute_dtype)
    info["seconds"] = time.perf_counter() - t0
    log.info("value head refit on %d states of %d questions: l2 %g, cross-validated MSE %.4f (constant %.4f)",
             info["states"], info["questions"], info["l2"], info["cv_mse"][str(info["l2"])], info["cv_constant_mse"])
    return info


def load_examples(path: str | Path) -> list[Example]:
    """Examples from a JSON-lines file (one Example.to_dict() per line)."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(Example.from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: not a training example: {e}") from e
    return out


@dataclass
class Candidate:
    """A checkpoint trained by `train_next_round`, recorded in the database but not promoted."""
    id: str
    path: Path
    round: int
    base: str
    job_id: str
    trees: int
    examples: int          # of the trees `base` built (result.examples: those trained on, after max_examples)
    result: TrainResult


def value_weights(examples: Sequence[Example], balance: bool) -> list[float]:
    """Per-example weight of its step ends in the value loss. Balanced: a correct path weighs
    n_wrong / n_correct (wrong paths 1), so the value loss sees as much "right" as "wrong"; a
    data-generation round finds a correct answer on only a few of its paths."""
    n_correct = sum(1 for e in examples if e.correct)
    if not balance or n_correct in (0, len(examples)):
        return [1.0] * len(examples)
    w = (len(examples) - n_correct) / n_correct
    return [w if e.correct else 1.0 for e in examples]


def value_fit_examples(trees, cfg: TrainConfig) -> list[Example]:
    """Every distinct finished path of the trees of questions not held out: what the value head is
    refit on (no per-question cap, see train)."""
    from trainer_svc.head_fit import finished_paths
    return finished_paths(trees, cfg.value_holdout, cfg.seed)


def training_examples(examples: Sequence[Example], cfg: TrainConfig) -> list[Example]:
    """Every example of the base's trees, less the held-out questions, capped per question."""
    kept = [e for e in examples if not held_out(e.question_id, cfg.value_holdout)]
    return cap_per_question(kept, seed=cfg.seed)


def train_next_round(store: "Store", checkpoint_dir: str | Path, cfg: TrainConfig | None = None, *,
                     base: "CheckpointRow | None" = None, rnd: int | None = None, job_id: str | None = None,
                     device: str | torch.device = "cpu",
                     on_progress: Callable[[Progress], None] | None = None) -> Candidate:
    """Train `base` (default: the checkpoint in force) on the examples of the trees it built (its
    value head is refit on those of `cfg.value_generations` checkpoints of its lineage), into
    `checkpoint_dir/<candidate id>`, tracking a training job (`job_id`, or a new one) in the store,
    and record the candidate (parent, round, trees, examples) unpromoted.

    Raises ValueError when there is nothing to train on (the job is marked failed either way)."""
    cfg = (cfg or TrainConfig()).validate()
    base = base or base_checkpoint(store)
    rnd = base.round + 1 if rnd is None else rnd
    job_id = job_id or store.create_job(base.id, rnd, asdict(cfg)).id
    try:
        examples = training_examples(store.examples(base.id), cfg)
        if not examples:
            raise ValueError(f"no training examples for checkpoint {base.id!r}: no finished trees it built "
                             "have been ingested yet (run GenerateTrees, let the trainer ingest them), "
                             f"or all of them are held out (value_holdout={cfg.value_holdout})")
        cand = candidate_id(base.id, rnd, fingerprint(base.path, examples, cfg))
        out = Path(checkpoint_dir) / cand
        store.update_job(job_id, state="running", examples=len(examples))
        log.info("round %d: training %s (%s) on %d examples into %s", rnd, base.id, base.path, len(examples), out)

        def progress(p: Progress) -> None:
            store.update_job(job_id, step=p.step, total_steps=p.total_steps, loss=p.loss, policy_loss=p.lm_loss,
                             value_loss=p.value_loss)
            if on_progress:
                on_progress(p)
        res = train(base.path, examples, out, cfg, on_progress=progress, device=device,
                    value_examples=value_fit_examples(lineage_trees(store, base.id, cfg.value_generations), cfg))
        trees = store.counts(base.id)["trees"]
        store.add_checkpoint(cand, str(out), rnd, parent=base.id, trees=trees, examples=len(examples))
        store.set_metrics(cand, {"value_holdout": cfg.value_holdout})  # the gate judges its head on those
    except Exception as e:
        store.update_job(job_id, state="failed", error=f"{type(e).__name__}: {e}")
        raise
    store.update_job(job_id, state="succeeded", output_checkpoint=cand, step=res.steps, total_steps=res.steps)
    log.info("round %d: candidate %s recorded (parent %s, %d trees, %d examples)", rnd, cand, base.id, trees,
             len(examples))
    return Candidate(cand, out, rnd, base.id, job_id, trees, len(examples), res)


_HYPER = (("epochs", int), ("learning_rate", float), ("value_head_lr", float), ("batch_size", int), ("grad_accum", int),
          ("warmup_ratio", float), ("value_loss_weight", float), ("max_len", int), ("max_examples", int), ("value_holdout", float), ("value_generations", int),
          ("seed", int), ("save_every", int))


def build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m trainer_svc.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train one round's candidate checkpoint (resumes an interrupted run).\n\n"
                    "With no --base/--examples/--out (the Kubernetes training Job): train the checkpoint in\n"
                    "force on the trees it built, from the database, into --checkpoint-dir/<candidate id>,\n"
                    "and record the candidate unpromoted. Every flag can be set as ALPHAMATH_TRAINER_<FLAG>\n"
                    "or ALPHAMATH_<FLAG>.")
    p.set_defaults(_service="trainer")
    p.add_argument("--base", default=None, help="offline mode: HF checkpoint dir to start from")
    p.add_argument("--examples", default=None, help="offline mode: JSON-lines file of examples")
    p.add_argument("--out", default=None, help="offline mode: output checkpoint dir")
    p.add_argument("--db-url", default=None, help="SQLAlchemy URL of the trainer database")
    p.add_argument("--db-schema", default=None, help="PostgreSQL schema")
    p.add_argument("--checkpoint-dir", default=None, help="where candidates are written (default: the cache)")
    p.add_argument("--model-dir", default=None,
                   help="round-0 base when no checkpoint is promoted yet (default: the embedded model)")
    for name, typ in _HYPER:
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None)
    p.add_argument("--dtype", default=None, help="compute dtype: bf16 | fp32 (default: bf16 where fast)")
    p.add_argument("--device", default="cpu", help="torch device: cpu | cuda | cuda:N")
    return p


def _main(argv: list[str] | None = None) -> int:
    import sys

    from alphamath.service import parse_config

    a = parse_config(build_parser(), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    offline = [a.base, a.examples, a.out]
    if any(offline) and not all(offline):
        print("error: --base, --examples and --out go together (or give none of them to train from the "
              "database)", file=sys.stderr)
        return 2
    try:
        cfg = TrainConfig(**{k: getattr(a, k) for k, _ in _HYPER if getattr(a, k) is not None},
                          dtype=a.dtype or None).validate()
        torch.device(a.device)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if all(offline):
        try:
            res = train(a.base, load_examples(a.examples), a.out, cfg, device=a.device)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        name = str(res.output_dir)
    else:
        from trainer_svc.store import Store

        store = Store(a.db_url, a.db_schema)
        try:
            cand = train_next_round(store, a.checkpoint_dir or checkpoint_root(), cfg,
                                    base=base_checkpoint(store, a.model_dir), device=a.device)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        finally:
            store.close()
        res, name = cand.result, f"candidate {cand.id} (round {cand.round}, parent {cand.base}) at {cand.path}"
    loss = "n/a" if res.loss is None else f"{res.loss:.4f}"
    print(f"trained {name}: {res.steps} steps on {res.examples} examples, loss {loss} "
          f"(resumed from step {res.resumed_from}) in {res.seconds:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
