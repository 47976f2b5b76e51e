"""Fit the value head to convergence on the trunk it will run with.

Why: joint training gives the head a few dozen noisy Adam steps on a few hundred step ends, and
measured in session 11/12 it did not even fit its own training data (in-sample AUC 0.535-0.676).
Here the trunk is frozen, so each state's last hidden state h is computed once and the head,
still V(s) = tanh(w.h + b), is fit by full-batch L-BFGS on the weighted squared error against the
step's mean outcome plus an L2 penalty on w. The penalty's strength is chosen by cross-validation
over *questions* (a fold never splits one question's states), because the head is used on
questions it never saw. This step is a deliberate difference from the paper's code, where the head
only learns jointly with the policy.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


@dataclass
class Features:
    """One row per distinct state (prompt + steps up to a step end) of the examples' paths."""
    x: torch.Tensor                      # [M, H] float32 last hidden states at the step ends
    y: torch.Tensor                      # [M] value targets (mean outcome)
    w: torch.Tensor                      # [M] weights (example weights, e.g. class balance)
    groups: list[str]                    # [M] question id of each row
    last_steps: list[str] = field(default_factory=list)  # [M] the state's last (rendered) step
    keys: list[str] = field(default_factory=list)        # [M] state_key of each row

    def take(self, idx: Sequence[int]) -> "Features":
        ix = torch.as_tensor(list(idx), dtype=torch.long)
        pick = lambda xs: [xs[i] for i in idx] if xs else []  # noqa: E731
        return Features(self.x[ix], self.y[ix], self.w[ix], pick(self.groups), pick(self.last_steps), pick(self.keys))


def state_key(example, k: int) -> str:
    """Identity of the state after step k of an example path: question, prompt and steps so far."""
    return hashlib.sha256("\x00".join((example.question_id, example.prompt, *example.steps[:k + 1])).encode()).hexdigest()


def step_features(lm, examples: Sequence, weights: Sequence[float] | None = None, chunk: int = 64) -> Features:
    """The value head's input at every distinct state of `examples`' paths (trainer_svc.examples.Example),
    read by the serving engine (alphamath.lm.LocalLM.features): the head is fit on exactly the
    numbers `score` will apply it to, state by state as inference tokenizes them. A state shared by
    several paths (a common prefix) is one row per question. A few questions at a time (about
    `chunk` states), their prompts go first, then their states by depth, so every state finds its
    parent in the prefix cache: a tree's prompt and shared steps are computed once, not once per
    path as a forward of each path would. One pass by depth over all questions did that only while
    the whole lineage fit in the cache: a lineage's states are far more tokens than the cache holds
    at the default memory budget, so prompts and parents were evicted before their children came."""
    from alphamath.steps import STEP_OPEN

    weights = [1.0] * len(examples) if weights is None else list(weights)
    rows: dict[str, tuple] = {}  # state key -> (depth, state, target, weight, question, last step)
    for ex, wt in zip(examples, weights):
        for k in range(len(ex.steps)):
            key = state_key(ex, k)
            if key not in rows:
                rows[key] = (k, ex.prompt + STEP_OPEN.join(ex.steps[:k + 1]), ex.values[k], wt, ex.question_id,
                             ex.steps[k])
    if not rows:
        raise ValueError("no step in any example")
    prompts: dict[str, dict[str, None]] = {}  # question -> its distinct prompts
    members: dict[str, list[str]] = {}  # question -> its states' keys
    for ex in examples:
        prompts.setdefault(ex.question_id, {})[ex.prompt] = None
    for key, row in rows.items():
        members.setdefault(row[4], []).append(key)
    keys: list[str] = []
    xs = []
    block: list[str] = []
    size = 0  # states in the block
    for n, q in enumerate(members, 1):
        block.append(q)
        size += len(members[q])
        if size < chunk and n < len(members):
            continue
        ps = [p for b in block for p in prompts[b]]
        for i in range(0, len(ps), chunk):
            lm.features(ps[i:i + chunk])
        by_depth = sorted((k for b in block for k in members[b]), key=lambda k: rows[k][0])  # stable
        for _, level in itertools.groupby(by_depth, key=lambda k: rows[k][0]):
            level = list(level)
            for i in range(0, len(level), chunk):
                xs.append(lm.features([rows[k][1] for k in level[i:i + chunk]]))
                keys.extend(level[i:i + chunk])
        block, size = [], 0
    col = lambda j: [rows[k][j] for k in keys]  # noqa: E731
    return Features(torch.cat(xs), torch.tensor(col(2), dtype=torch.float32), torch.tensor(col(3), dtype=torch.float32),
                    col(4), col(5), keys)


def fit_head(f: Features, l2: float, iters: int = 200) -> tuple[torch.Tensor, float]:
    """(w [H], b) minimising sum_i w_i (tanh(w.x_i + b) - y_i)^2 / sum_i w_i + l2 |w_std|^2, with x
    standardised per dimension for conditioning (the result is mapped back to raw x)."""
    x = f.x.double()
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mu) / sd
    y, wt = f.y.double(), f.w.double() / f.w.double().sum()
    a = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    mean_y = float((wt * y).sum().clamp(-0.999, 0.999))
    b = torch.tensor(math.atanh(mean_y), dtype=torch.float64, requires_grad=True)  # start at the best constant
    opt = torch.optim.LBFGS([a, b], lr=1, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (wt * (torch.tanh(z @ a + b) - y) ** 2).sum() + l2 * (a * a).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_raw = (a.detach() / sd)
    return w_raw.float(), float(b.detach() - (w_raw * mu).sum())


def predict(x: torch.Tensor, w: torch.Tensor, b: float) -> torch.Tensor:
    return torch.tanh(x.float() @ w + b)


def folds(groups: Sequence[str], k: int, seed: int = 0) -> list[list[int]]:
    """Row indices of k folds, each holding whole questions (a reproducible shuffle)."""
    qs = sorted(set(groups))
    random.Random(seed).shuffle(qs)
    fold_of = {q: i % k for i, q in enumerate(qs)}
    out: list[list[int]] = [[] for _ in range(k)]
    for i, g in enumerate(groups):
        out[fold_of[g]].append(i)
    return [f for f in out if f]


def cv_mse(f: Features, l2: float | None, k: int = 5, seed: int = 0) -> float:
    """Weighted held-out squared error of the head fit with `l2` over question folds; l2 None:
    of the constant predictor (the training folds' weighted mean target), the bar to clear."""
    parts = folds(f.groups, k, seed)
    err, tot = 0.0, 0.0
    for i, test in enumerate(parts):
        train = [j for p, part in enumerate(parts) if p != i for j in part]
        if not train:
            continue
        tr, t = f.take(train), f.take(test)
        if l2 is None:
            pred = ((tr.w * tr.y).sum() / tr.w.sum()).expand(len(t.y))
        else:
            w, b = fit_head(tr, l2)
            pred = predict(t.x, w, b)
        err += float((t.w * (pred - t.y) ** 2).sum())
        tot += float(t.w.sum())
    return err / tot if tot else float("inf")


def choose_l2(f: Features, grid: Sequence[float] = L2_GRID, k: int = 5, seed: int = 0) -> tuple[float, dict]:
    """The grid's L2 strength with the lowest cross-validated error, and the error of each. With
    fewer than two questions nothing can be held out: the strongest penalty, untested."""
    if len(set(f.groups)) < 2:
        return max(grid), {max(grid): float("nan")}
    table = {l2: cv_mse(f, l2, k, seed) for l2 in grid}
    return min(table, key=table.get), table


def finished_paths(trees, holdout: float, seed: int = 0) -> list:
    """Every distinct finished path of the trees of questions `trainer_svc.examples.held_out` does
    not keep out: what a head is fit on (no per-question cap: the head must see states as search
    meets them)."""
    from trainer_svc.examples import extract_examples, held_out

    return [e for t in trees if not held_out(t.question_id or "", holdout)
            for e in extract_examples(t, 10 ** 6, 10 ** 6, seed=seed)]


def refit(model, examples: Sequence, weights: Sequence[float] | None = None, dtype: str | None = None) -> dict:
    """Replace `model`'s value head by one fit on its trunk's features at the examples' states, as
    the engine computes them in `dtype` (default: the serving dtype), L2 chosen by cross-validation
    over questions; returns what was chosen and why."""
    import copy

    from alphamath.lm import LocalLM
    from alphamath.model import ValueHeadModel, default_dtype

    serving = ValueHeadModel(copy.deepcopy(model.lm).to(default_dtype(dtype, model.device)), model.tokenizer)
    feats = step_features(LocalLM(serving), examples, weights)
    l2, table = choose_l2(feats)
    w, b = fit_head(feats, l2)
    with torch.no_grad():
        model.value_head.weight.copy_(w.view(1, -1).to(model.value_head.weight))
        model.value_head.bias.fill_(b)
    return {"states": len(feats.y), "questions": len(set(feats.groups)), "l2": l2,
            "cv_mse": {str(k): v for k, v in table.items()}, "cv_constant_mse": cv_mse(feats, None)}


def fit_checkpoint(base: str, trees, out: str, holdout: float = 0.25, dtype: str | None = None) -> dict:
    """A value head for an existing checkpoint, the policy untouched: fit on every finished path
    of the trees' training questions (the held-out ones are left for judging it) and write base +
    head to `out`."""
    from alphamath.model import ValueHeadModel

    examples = finished_paths(trees, holdout)
    if not examples:
        raise ValueError("no finished path with ground truth in the training questions' trees")
    model = ValueHeadModel.from_pretrained(base, dtype=dtype)
    info = refit(model, examples, dtype=dtype)
    model.save_pretrained(out)
    return {"paths": len(examples), **info}


def main(argv=None) -> int:
    import argparse
    import json
    from pathlib import Path

    from alphamath.model import embedded_checkpoint
    from alphamath.tree import Tree

    ap = argparse.ArgumentParser(description="Fit a value head for a checkpoint on data-generation trees "
                                             "(the policy is not trained).")
    ap.add_argument("--trees", required=True, help="JSON lines of finished trees with ground truth")
    ap.add_argument("--out", required=True, help="directory for the checkpoint with its new head")
    ap.add_argument("--model", default=None, help="base checkpoint (default: the embedded model)")
    ap.add_argument("--holdout", type=float, default=0.25, help="share of questions kept out (by id hash)")
    a = ap.parse_args(argv)
    lines = Path(a.trees).read_text().splitlines()
    trees = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                trees.append(Tree.from_json(line))
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"{a.trees}:{i}: not a tree: {e}")
    info = fit_checkpoint(a.model or str(embedded_checkpoint()), trees, a.out, a.holdout)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
