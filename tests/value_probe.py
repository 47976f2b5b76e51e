"""What do the trees teach a value head, and how much of it do the training examples use?

A linear probe on a frozen trunk: ridge regression from the last hidden state at each state's end
(where the value head reads) onto the step's Q, fit on one set of trees and judged on another as
`value-report` judges a head (AUC at answer nodes against correctness, MSE at visited steps against
Q, and that MSE over the best constant's). It needs no training run, so it separates the data
question from the optimisation question. Supervision sets compared:
  capped        the states on the paths `extract_examples` keeps (<= 4 correct + 4 wrong per tree):
                what a round trains the value head on today
  all           every visited step (target Q) and every answer leaf (target +1 / -1)
  *_balanced    the same, with answer leaves weighted so correct and wrong ones weigh the same
The ridge strength is chosen on the training trees alone (grouped 3-fold CV by tree, lowest MSE).

    python -m tests.value_probe --train A.jsonl --test B.jsonl [--model DIR] [--cache DIR]
    python -m tests.value_probe --train A.jsonl --folds 4      # grouped k-fold over A's trees

Features are computed once per tree: the prompt's KV once, then every leaf's path in batches, so
each node's state is read where its path's tokenization puts it (the last token ending at or
before the state's end, as training's collate reads it).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
from pathlib import Path

import numpy as np

LAMBDAS = (1.0, 10.0, 100.0, 1000.0, 10000.0)
SETS = ("capped", "capped_balanced", "all", "all_balanced")


def capped_node_ids(tree) -> set[int]:
    """Ids of the nodes on the paths `extract_examples` keeps (the same selection, mapped back)."""
    from alphamath.steps import render_step
    from trainer_svc.examples import Example, all_code_failed, extract_examples, path_label
    keep = {e.key for e in extract_examples(tree)}
    ids = set()
    for leaf in tree.leaves():
        if path_label(tree, leaf) is None:
            continue
        path = tree.path(leaf.id)
        if all_code_failed(path):
            continue
        ex = Example(question_id="-", prompt=tree.prompt, steps=tuple(render_step(n.step()) for n in path),
                     values=tuple(0.0 for _ in path), correct=True)
        if ex.key in keep:
            ids.update(n.id for n in path if n.id != 0)
    return ids


def features(model, tok, tree, batch: int = 8, all_layers: bool = False) -> dict[int, np.ndarray]:
    """Last hidden state (after the final norm) at each non-root node's state end. With `all_layers`,
    an array [2, layers + 1, H] per node (float16) instead: [0] every layer's output (the embeddings first,
    the final norm's last) at the state end, [1] the same averaged over the step's own tokens
    (a pooled read of the step rather than of its last token)."""
    import torch
    leaves = [n for n in tree.nodes if not n.children]
    enc = [tok(tree.state(leaf.id), add_special_tokens=False, return_offsets_mapping=True) for leaf in leaves]
    first = enc[0]["input_ids"]
    P = len(first)
    for e in enc:  # the token prefix every leaf shares (at least the prompt's first tokens)
        ids, k = e["input_ids"], 0
        while k < min(P, len(ids)) and ids[k] == first[k]:
            k += 1
        P = k
    P = max(1, P - 1)
    out: dict[int, np.ndarray] = {}
    end_of = {n.id: len(tree.state(n.id)) for n in tree.nodes}  # each node's state end, in characters
    with torch.inference_mode():
        prefix = model.model(input_ids=torch.tensor([first[:P]]), use_cache=True).past_key_values
        for b in range(0, len(leaves), batch):
            group = list(range(b, min(b + batch, len(leaves))))
            suffix = [enc[i]["input_ids"][P:] for i in group]
            L = max(len(s) for s in suffix)
            x = torch.zeros(len(group), L, dtype=torch.long)
            mask = torch.zeros(len(group), P + L, dtype=torch.long)
            mask[:, :P] = 1
            for j, s in enumerate(suffix):
                x[j, :len(s)] = torch.tensor(s)
                mask[j, P:P + len(s)] = 1
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(len(group))
            res = model.model(input_ids=x, attention_mask=mask, past_key_values=cache, output_hidden_states=all_layers)
            h = torch.stack(res.hidden_states, 1).float() if all_layers else res.last_hidden_state.float()
            for j, i in enumerate(group):
                offsets = enc[i]["offset_mapping"]
                def last_token(end):  # the last token ending at or before character `end`
                    return max(q for q, (_, e) in enumerate(offsets) if e <= end)
                start = last_token(end_of[0])  # the parent's state end, as a token position
                for node in tree.path(leaves[i].id):
                    pos = last_token(end_of[node.id])
                    if node.id != 0 and node.id not in out and pos >= P:
                        if all_layers:
                            lo = max(start + 1, P)
                            out[node.id] = torch.stack([h[j, :, pos - P], h[j, :, lo - P:pos - P + 1].mean(1)]).half().numpy()
                        else:
                            out[node.id] = h[j, pos - P].numpy()
                    start = pos
    return out


def tree_rows(tree, feats) -> dict:
    """The probe's view of one tree: features, targets and which supervision set each node is in."""
    from alphamath.metrics import scored_nodes
    outcomes = tree.outcome_values()  # the training target (every scored or capped node has one)
    answers, steps = scored_nodes(tree, outcomes)
    answers, steps = [a for a in answers if a in feats], [s for s in steps if s in feats]

    capped = capped_node_ids(tree) & set(feats)
    ids = sorted(set(answers) | set(steps) | capped)
    return {"X": np.stack([feats[i] for i in ids]) if ids else np.zeros((0, 1)), "ids": ids,
            "y": np.array([outcomes[i] for i in ids]), "answer": np.array([i in answers for i in ids]),
            "correct": np.array([bool(tree.nodes[i].correct) for i in ids]),
            "step": np.array([i in steps for i in ids]), "capped": np.array([i in capped for i in ids])}


def training_data(rows, which: str):
    X, y, w = [], [], []
    for r in rows:
        sel = r["capped"] if which.startswith("capped") else (r["step"] | r["answer"])
        X.append(r["X"][sel]), y.append(r["y"][sel]), w.append(np.ones(int(sel.sum())))
    X, y, w = np.concatenate(X), np.concatenate(y), np.concatenate(w)
    if which.endswith("balanced"):  # answer-like targets: +1 and -1 weigh the same in total
        pos, neg = y > 0.999, y < -0.999
        if pos.any() and neg.any():
            w[pos] = neg.sum() / pos.sum()
    return X, y, w


def fit(X, y, w, lam):
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Z = (X - mu) / sd
    ym = float(np.average(y, weights=w))
    Zw = Z * w[:, None]
    coef = np.linalg.solve(Z.T @ Zw + lam * np.eye(Z.shape[1]), Zw.T @ (y - ym))
    return lambda Xn: np.clip(((Xn - mu) / sd) @ coef + ym, -1.0, 1.0)


def judge(predict, rows) -> dict:
    from alphamath.metrics import roc_auc
    pa, la, ps, ts = [], [], [], []
    for r in rows:
        if r["answer"].any():
            pa += list(predict(r["X"][r["answer"]]))
            la += list(r["correct"][r["answer"]])
        if r["step"].any():
            ps += list(predict(r["X"][r["step"]]))
            ts += list(r["y"][r["step"]])
    ps, ts = np.array(ps), np.array(ts)
    m, c = float(np.mean((ps - ts) ** 2)), float(np.mean((ts - ts.mean()) ** 2))
    return {"auc": roc_auc(pa, [bool(x) for x in la]), "answers": len(la), "answers_correct": int(sum(la)),
            "mse": m, "constant_mse": c, "mse_ratio": m / c if c else None}


def choose_lambda(rows, which: str, seed: int = 0) -> float:
    """Lowest held-out MSE at visited steps over a grouped 3-fold split of the training trees."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    best = None
    for lam in LAMBDAS:
        err = []
        for k in range(3):
            test = [rows[i] for i in order[k::3]]
            train = [rows[i] for i in order if i not in order[k::3]]
            if not test or not train:  # fewer than 3 trees
                continue
            err.append(judge(fit(*training_data(train, which), lam), test)["mse"])
        if best is None or np.mean(err) < best[0]:
            best = (float(np.mean(err)), lam)
    return best[1]


def probe(train_rows, test_rows, sets=SETS) -> dict:
    out = {}
    for which in sets:
        lam = choose_lambda(train_rows, which)
        X, y, w = training_data(train_rows, which)
        out[which] = {"lambda": lam, "train_states": int(len(y)), **judge(fit(X, y, w, lam), test_rows)}
    return out


def kfold(rows, k: int, sets=SETS, train_trees: int | None = None) -> dict:
    """Grouped k-fold over trees: each tree is judged by a probe fit without it; fold means.
    `train_trees`: fit on only that many of the other trees (a seeded sample), for a learning curve."""
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    folds = []
    for j in range(k):
        train = [rows[i] for i in order if i not in order[j::k]]
        if train_trees is not None:
            train = random.Random(j).sample(train, min(train_trees, len(train)))
        folds.append(probe(train, [rows[i] for i in order[j::k]], sets))
    return {w: {key: float(np.mean([f[w][key] for f in folds if f[w][key] is not None])) for key in folds[0][w]}
            for w in sets}


def layer_sweep(rows, k: int, say=print) -> dict:
    """The "all" probe read from each layer's output, at the state end and pooled over the step;
    then a learning curve (training trees per fold) for the last layer and the best one."""
    out, rows = {}, [r for r in rows if r["ids"]]

    def view(pool, layer):
        return [{**r, "X": r["X"][:, pool, layer].astype(np.float32)} for r in rows]

    for pool, name in enumerate(("end", "step_mean")):
        for layer in range(rows[0]["X"].shape[2]):
            r = kfold(view(pool, layer), k, ("all",))["all"]
            out[f"{name}/{layer}"] = r
            say(f"{name:<9} layer {layer:>2}  lambda {r['lambda']:>7.0f}  AUC {r['auc']:.3f}"
                f"  MSE ratio {r['mse_ratio']:.3f}")
    last = f"end/{rows[0]['X'].shape[2] - 1}"
    best = min(out, key=lambda key: out[key]["mse_ratio"])
    n_train = len(rows) - -(-len(rows) // k)
    for key in dict.fromkeys((last, best)):
        name, layer = key.split("/")
        for n in sorted({n_train // 4, n_train // 2, n_train}):
            r = kfold(view(("end", "step_mean").index(name), int(layer)), k, ("all",), train_trees=n)["all"]
            out[f"curve/{key}/{n}"] = r
            say(f"curve {key:<13} {n:>3} training trees  AUC {r['auc']:.3f}  MSE ratio {r['mse_ratio']:.3f}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.value_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help="JSON-lines trees with ground truth")
    ap.add_argument("--test", help="JSON-lines trees judged (default: grouped --folds over --train)")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--model", help="HF checkpoint dir whose trunk is probed (default: the embedded model)")
    ap.add_argument("--cache", default="var/probe", help="features are kept here per tree and model")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--all-layers", action="store_true",
                    help="probe every layer's output, at the state end and averaged over the step (grouped k-fold)")
    ap.add_argument("--out", help="write the results here as JSON")
    a = ap.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from alphamath.model import default_dtype, embedded_checkpoint
    from alphamath.tree import Tree
    from trainer_svc.examples import tree_hash
    if a.threads:
        torch.set_num_threads(a.threads)
    model_dir = a.model or str(embedded_checkpoint())
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = None
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:12] + ("-layers" if a.all_layers else "")

    def rows_of(path):
        nonlocal model
        rows = []
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            tree = Tree.from_json(line)
            if tree.ground_truth is None:
                continue
            f = cache / f"{tag}-{tree_hash(tree)[:20]}.npz"
            if f.exists():
                z = np.load(f)
                feats = {int(k): z[k] for k in z.files}
            else:
                if model is None:
                    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=default_dtype()).eval()
                feats = features(model, tok, tree, all_layers=a.all_layers)
                np.savez(f, **{str(k): v for k, v in feats.items()})
            rows.append(tree_rows(tree, feats))
            print(f"  features: {path} tree {len(rows)}", flush=True)
        return rows

    train = rows_of(a.train)
    if a.all_layers:
        result = layer_sweep(train, a.folds)
        if a.out:
            Path(a.out).write_text(json.dumps({"model": model_dir, "train": a.train, "layers": result}, indent=1))
        return 0
    result = probe(train, rows_of(a.test)) if a.test else kfold(train, a.folds)
    for which, r in result.items():
        print(f"{which:<16} train states {r['train_states']:>6.0f}  lambda {r['lambda']:>7.0f}  AUC {r['auc']:.3f}"
              f"  MSE {r['mse']:.3f} / constant {r['constant_mse']:.3f} = {r['mse_ratio']:.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"model": model_dir, "train": a.train, "test": a.test, "result": result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
