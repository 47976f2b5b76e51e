"""Does a value head fit to convergence (trainer_svc.head_fit) rank answers on questions it never saw?

    python -m tests.head_fit_probe --trees T.jsonl [--model DIR] [--out probe.json]
    python -m tests.head_fit_probe --trees TRAIN.jsonl --test TEST.jsonl [--model DIR]

Features: the trunk of --model (default: the embedded model) at every step end of every finished
path of the trees. Outer 4-fold cross-validation over questions: for each fold the L2 strength is
chosen by an inner 5-fold CV on the other folds, the head is fit there and scores the fold's
states. Reported on those out-of-fold predictions: AUC at answer states (pooled and within a
question), best-of-N beside random and majority vote, MSE against the mean outcome beside the
constant predictor fit on the training folds. Variants: all finished paths or the trainer's
4 + 4 per question; plain or class-balanced weights. With --test: one head fit on every finished
path of --trees, judged on --test's (e.g. to compare trunks on the same split).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _examples(trees, cap):
    from trainer_svc.examples import extract_examples
    out = []
    for t in trees:
        out += extract_examples(t, cap, cap) if cap else extract_examples(t, 10 ** 6, 10 ** 6)
    return out


def _weights(f, balanced: bool) -> None:
    """Class balance: states with a positive target weigh n_nonpositive / n_positive."""
    import torch
    if balanced:
        n_pos, n_neg = float((f.y > 0).sum()), float((f.y <= 0).sum())
        f.w = torch.where(f.y > 0, torch.tensor(n_neg / max(n_pos, 1.0)), torch.tensor(1.0))
    else:
        f.w = torch.ones(len(f.y))


def _judge(f, pred, const) -> dict:
    """AUC at answer states (pooled and within a question), best-of-N beside random and majority
    vote, MSE against the mean outcome beside the training folds' constant."""
    from alphamath.answer import boxed_content
    from alphamath.metrics import per_question, roc_auc

    boxed = [boxed_content(s) for s in f.last_steps]
    ans = [i for i, a in enumerate(boxed) if a is not None]
    labels = [bool(f.y[i] > 0) for i in ans]
    rows: dict[str, list] = {}
    for i in ans:
        rows.setdefault(f.groups[i], []).append((float(pred[i]), bool(f.y[i] > 0), boxed[i]))
    mse, cmse = float(((pred - f.y) ** 2).mean()), float(((const - f.y) ** 2).mean())
    return {"rows": len(f.y), "answers": len(ans), "answers_correct": sum(labels),
            "auc": roc_auc([float(pred[i]) for i in ans], labels), "mse": mse, "constant_mse": cmse,
            "mse_ratio": mse / cmse if cmse else None, **per_question(list(rows.values()))}


def evaluate(f, balanced: bool, outer: int = 4) -> dict:
    """Out-of-fold predictions of a head fit on the other question folds, and their metrics."""
    import torch

    from trainer_svc.head_fit import choose_l2, fit_head, folds, predict

    _weights(f, balanced)
    pred, const, l2s = torch.zeros(len(f.y)), torch.zeros(len(f.y)), []
    parts = folds(f.groups, outer, seed=1)
    for i, test in enumerate(parts):
        tr = f.take([j for k, part in enumerate(parts) if k != i for j in part])
        l2, _ = choose_l2(tr)
        w, b = fit_head(tr, l2)
        l2s.append(l2)
        pred[test] = predict(f.take(test).x, w, b)
        const[test] = float(tr.y.mean())
    return {"balanced": balanced, "l2": l2s, **_judge(f, pred, const)}


def split(train, test, balanced: bool) -> dict:
    """A head fit on `train`'s states (L2 by cross-validation over its questions), judged on `test`'s."""
    from trainer_svc.head_fit import choose_l2, fit_head, predict

    _weights(train, balanced)
    l2, _ = choose_l2(train)
    w, b = fit_head(train, l2)
    return {"balanced": balanced, "l2": l2, **_judge(test, predict(test.x, w, b), float(train.y.mean()))}


def main(argv=None) -> int:
    from alphamath.lm import LocalLM
    from alphamath.model import embedded_checkpoint
    from alphamath.tree import Tree
    from trainer_svc.head_fit import state_key, step_features

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--test", default=None, help="judge a head fit on all of --trees on these trees instead")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    def load(path):
        return [Tree.from_json(line) for line in Path(path).read_text().splitlines() if line.strip()]
    trees = load(a.trees)
    lm = LocalLM(a.model or str(embedded_checkpoint()))
    report = {"trees": len(trees), "variants": []}
    t0 = time.perf_counter()
    if a.test:
        train, test = step_features(lm, _examples(trees, None)), step_features(lm, _examples(load(a.test), None))
        print(f"{len(train.y)} training states, {len(test.y)} judged, features {time.perf_counter() - t0:.0f}s")
        for balanced in (False, True):
            report["variants"].append(split(train, test, balanced))
            print(json.dumps(report["variants"][-1]), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(report, indent=1))
        return 0
    exs = _examples(trees, None)
    feats = step_features(lm, exs)
    print(f"{len(exs)} paths, {len(feats.y)} states, features {time.perf_counter() - t0:.0f}s", flush=True)
    capped = {state_key(e, k) for e in _examples(trees, 4) for k in range(len(e.steps))}
    for cap in (None, 4):
        f = feats if cap is None else feats.take([i for i, key in enumerate(feats.keys) if key in capped])
        for balanced in (False, True):
            r = evaluate(f, balanced)
            r["cap"] = cap
            report["variants"].append(r)
            print(json.dumps(r), flush=True)
            if a.out:
                Path(a.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
