"""What stops the value head from learning? Train one round's candidate under several settings on the
same data-generation trees and judge each head on the held-out questions' trees (value-report).

    python -m tests.value_ablation --trees var/vh/trees64.jsonl --out var/vh/ablation.json \
        [--configs shared_lr,head_lr,head_lr_alpha1,probe] [--epochs 2]

The questions split by `trainer_svc.examples.held_out` (25% held out), as rounds split them.
Configs:
  shared_lr       one learning rate (2e-5) for trunk and head: the setting of the earlier rounds
  head_lr         the head on its own learning rate (1e-3), trunk 2e-5 (the default now)
  head_lr_alpha1  as head_lr with alpha = 1 (the value loss weighs as much as the LM loss)
  probe           trunk frozen, only the head trains (a linear probe: what the features hold)
  head_lr_balanced  as head_lr with class-balanced value loss (correct paths weigh n_wrong/n_correct)
The report is rewritten after every config; a config already in it is skipped.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _trees(path):
    from alphamath.tree import Tree
    return [Tree.from_json(line) for line in Path(path).read_text().splitlines() if line.strip()]


CONFIGS = {
    "shared_lr": dict(learning_rate=2e-5, value_head_lr=2e-5, value_loss_weight=0.1),
    "head_lr": dict(learning_rate=2e-5, value_head_lr=1e-3, value_loss_weight=0.1),
    "head_lr_alpha1": dict(learning_rate=2e-5, value_head_lr=1e-3, value_loss_weight=1.0),
    "probe": dict(learning_rate=1e-12, value_head_lr=1e-3, value_loss_weight=1.0),
    "head_lr_balanced": dict(learning_rate=2e-5, value_head_lr=1e-3, value_loss_weight=0.1, value_balance=True),
}


def main(argv=None) -> int:
    from alphamath.metrics import value_report
    from alphamath.model import embedded_checkpoint
    from alphamath.runtime import load_engine
    from search_svc.engine import default_checker
    from trainer_svc.examples import extract_examples, held_out
    from trainer_svc.train import TrainConfig, train, training_examples

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", default="shared_lr,head_lr,head_lr_alpha1")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--base", default=None, help="checkpoint to train (default: the embedded model)")
    ap.add_argument("--fit-trees", type=int, default=8, help="training trees also scored (in-sample fit)")
    a = ap.parse_args(argv)
    trees = _trees(a.trees)
    share = TrainConfig().value_holdout
    held = [t for t in trees if held_out(t.question_id or "", share)]
    fit = [t for t in trees if not held_out(t.question_id or "", share)]
    base = a.base or str(embedded_checkpoint())
    out = Path(a.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    report.setdefault("_data", {"trees": len(trees), "held_out_trees": len(held), "training_trees": len(fit),
                                "with_correct_path": sum(any(n.correct for n in t.nodes) for t in trees)})
    examples = [e for t in fit for e in extract_examples(t)]

    def judge(name, model_dir):
        eng = load_engine(model_dir)
        t0 = time.perf_counter()
        held_rep = value_report(held, eng.value, check=default_checker())
        fit_rep = value_report(fit[:a.fit_trees], eng.value, check=default_checker())  # in-sample: does it fit?
        row = {"held_out": {k: v for k, v in held_rep.to_dict().items() if k != "per_tree"},
               "training_trees": {k: v for k, v in fit_rep.to_dict().items() if k not in ("per_tree", "reliability")},
               "score_s": round(time.perf_counter() - t0, 1)}
        print(f"{name}: held-out {held_rep.summary()}\n{' ' * len(name)}  training {fit_rep.summary()}", flush=True)
        return row

    if "zero_head" not in report:
        report["zero_head"] = judge("zero_head", base)
        out.write_text(json.dumps(report, indent=1))
    for name in [c for c in a.configs.split(",") if c]:
        if name in report:
            print(f"{name}: already in {out}")
            continue
        cfg = TrainConfig(epochs=a.epochs, batch_size=4, max_len=1024, **CONFIGS[name])
        kept = training_examples(examples, cfg)
        ckpt = out.parent / f"ablation-{name}"
        t0 = time.perf_counter()
        res = train(base, kept, ckpt, cfg, on_progress=lambda p: print(
            f"  {name} step {p.step}/{p.total_steps} loss {p.loss:.4f} (lm {p.lm_loss:.4f}, value {p.value_loss:.4f})",
            flush=True) if p.step % 10 == 0 or p.step == p.total_steps else None)
        row = {"config": CONFIGS[name], "epochs": a.epochs, "examples": len(kept),
               "correct_examples": sum(e.correct for e in kept), "train_s": round(time.perf_counter() - t0, 1),
               "final_value_loss": res.value_loss, **judge(name, ckpt)}
        report[name] = row
        out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
