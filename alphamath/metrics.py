"""How good is a value head, and is one model better than another? Metrics as the field reports them.

A value head is a process reward model, so it is judged the way PRMs are:
  discrimination  ROC AUC of the head's value at answer nodes against their correctness
                  (0.5: no better than a coin; a constant head reads exactly 0.5)
  regression      MSE of the head's value against each visited step's mean outcome (its training
                  target, Tree.outcome_values), beside the MSE of
                  the best constant predictor on the same steps (the targets' variance): a ratio
                  below 1 means the head knows something about *which* step is good, not just the
                  base rate
  calibration     a reliability diagram: predicted value bins against the observed share correct
  per question    the pooled AUC also rewards a head that only knows which questions are easy, so
                  the answers to one question are judged on their own too: the mean AUC over trees
                  holding right and wrong answers, and best-of-N selection (the share of trees
                  whose highest-valued answer is right) beside a random pick and a majority vote
                  over the same answers, as PRMs are compared with self-consistency

Accuracy differences between two models on the same problems are paired, so they are tested as
paired outcomes (an exact sign test and a paired bootstrap), not as two independent proportions.

`value_report` scores the states of finished data-generation trees with a head; it never takes a
value stored in a tree for a prediction (in such a tree a terminal's value is its reward).
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

from alphamath.interfaces import Value
from alphamath.tree import Tree

# ---- pure metrics ----------------------------------------------------------------------------


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """P(score of a random positive > score of a random negative), ties counted half
    (Mann-Whitney U / (n_pos * n_neg)). None when one class is empty: AUC is undefined there."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    # rank-sum with average ranks for ties: O(n log n)
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        avg = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[order[k]] = avg
        i = j + 1
    rank_pos = sum(r for r, y in zip(ranks, labels) if y)
    u = rank_pos - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def mse(pred: Sequence[float], target: Sequence[float]) -> float:
    if len(pred) != len(target) or not pred:
        raise ValueError(f"need equal, non-empty lengths, got {len(pred)} and {len(target)}")
    return sum((p - t) ** 2 for p, t in zip(pred, target)) / len(pred)


def constant_predictor(target: Sequence[float]) -> tuple[float, float]:
    """The best constant under squared error (the mean) and its MSE (the targets' variance)."""
    if not target:
        raise ValueError("no targets")
    c = sum(target) / len(target)
    return c, sum((t - c) ** 2 for t in target) / len(target)


def reliability(pred: Sequence[float], labels: Sequence[bool], bins: int = 10) -> list[dict]:
    """Equal-width bins of predicted value over [-1, 1]; per bin the count, the mean predicted
    probability of being correct ((v + 1) / 2) and the observed share correct."""
    rows = [{"lo": -1 + 2 * b / bins, "hi": -1 + 2 * (b + 1) / bins, "n": 0, "sum_p": 0.0, "sum_y": 0}
            for b in range(bins)]
    for v, y in zip(pred, labels):
        b = min(bins - 1, max(0, int((v + 1) / 2 * bins)))
        rows[b]["n"] += 1
        rows[b]["sum_p"] += (v + 1) / 2
        rows[b]["sum_y"] += bool(y)
    out = []
    for r in rows:
        n = r["n"]
        out.append({"lo": round(r["lo"], 6), "hi": round(r["hi"], 6), "n": n,
                    "predicted": r["sum_p"] / n if n else None, "observed": r["sum_y"] / n if n else None})
    return out


def expected_calibration_error(bins: Sequence[dict]) -> float | None:
    total = sum(b["n"] for b in bins)
    if not total:
        return None
    return sum(b["n"] * abs(b["predicted"] - b["observed"]) for b in bins if b["n"]) / total


def sign_test(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact sign test on paired binary outcomes (McNemar's exact test): only problems that one
    model solves and the other does not carry information. `p_value` is two-sided; `p_a_worse` is
    one-sided, P(a wins at most a_only of the discordant problems | no difference): the test for
    "is a worse than b?", which is what a promotion gate asks."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    n = a_only + b_only
    k = min(a_only, b_only)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    worse = sum(math.comb(n, i) for i in range(a_only + 1)) / 2 ** n if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "p_value": p, "p_a_worse": worse}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 10_000,
                     seed: int = 0, confidence: float = 0.95) -> dict:
    """Mean of a - b over paired items with a percentile bootstrap interval (items resampled with
    replacement), and the share of resamples where a - b < 0 (how often a looks worse by chance)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples need equal, non-empty lengths, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n, rng = len(d), random.Random(seed)
    means = [sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples)]
    lo, hi = percentile_interval(means, confidence)
    return {"diff": sum(d) / n, "lo": lo, "hi": hi, "p_below_zero": sum(m < 0 for m in means) / resamples}


def percentile_interval(stats: Sequence[float], confidence: float) -> tuple[float, float]:
    """The central `confidence` share of bootstrap statistics: (lower, upper) percentiles."""
    s = sorted(stats)
    return s[int((1 - confidence) / 2 * len(s))], s[min(len(s) - 1, int((1 + confidence) / 2 * len(s)))]


def auc_interval(per_tree: Sequence[Sequence[tuple[float, bool]]], resamples: int = 1000, seed: int = 0,
                 confidence: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the pooled AUC, resampling whole trees: a tree's answers
    share a question, so they are not independent draws. Two reports on different trees (the gate's
    held-out quarter of a round, the next round's fresh trees) agree when their intervals overlap.
    None when no resample has both classes."""
    trees = [t for t in per_tree if t]
    if not trees:
        return None
    rng, aucs = random.Random(seed), []
    for _ in range(resamples):
        pick = [trees[rng.randrange(len(trees))] for _ in trees]
        a = roc_auc([v for t in pick for v, _ in t], [c for t in pick for _, c in t])
        if a is not None:
            aucs.append(a)
    return percentile_interval(aucs, confidence) if aucs else None


# ---- the value report of a head on finished trees ---------------------------------------------


@dataclass
class ValueReport:
    trees: int
    answers: int                 # answer nodes scored for AUC
    answers_correct: int
    auc: float | None
    steps: int                   # visited non-root steps scored for MSE
    mse: float | None
    constant: float | None       # the best constant (mean Q)
    constant_mse: float | None
    mse_ratio: float | None      # mse / constant_mse (< 1: better than the base rate)
    ece: float | None
    reliability: list[dict] = field(default_factory=list)
    per_tree: list[dict] = field(default_factory=list)   # for paired comparisons between heads
    within_auc: float | None = None   # mean AUC over the trees that hold right and wrong answers
    within_trees: int = 0             # how many trees that is
    best_of_n: float | None = None    # share of trees whose highest-valued answer is right
    random_pick: float | None = None  # the same for a uniformly random answer (a constant head)
    majority: float | None = None     # the same for the most frequent answer (self-consistency)
    oracle: float | None = None       # share of trees holding a right answer: a perfect head's best-of-N
    question_ratio: float | None = None  # the MSE ratio of a head that knew each tree's mean target and
                                         # nothing within a tree: what ranking questions alone can reach
    auc_lo: float | None = None       # 95% bootstrap interval of auc, trees resampled (auc_interval)
    auc_hi: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        f = lambda v, p=3: "n/a" if v is None else f"{v:.{p}f}"  # noqa: E731
        ci = f" [{f(self.auc_lo)}, {f(self.auc_hi)}]" if self.auc_lo is not None else ""
        return (f"{self.trees} trees: AUC {f(self.auc)}{ci} on {self.answers} answers "
                f"({self.answers_correct} correct); "
                f"MSE {f(self.mse)} vs constant {f(self.constant_mse)} (ratio {f(self.mse_ratio)}) "
                f"on {self.steps} steps; ECE {f(self.ece)}; per question: AUC {f(self.within_auc)} "
                f"({self.within_trees} trees), best-of-N {f(self.best_of_n)} vs random {f(self.random_pick)} "
                f"and majority {f(self.majority)}, oracle {f(self.oracle)}; a head that knew only each "
                f"question's mean target: ratio {f(self.question_ratio)}")


def question_ratio(per_tree_targets: Sequence[Sequence[float]]) -> float | None:
    """MSE of predicting every step by its own tree's mean target, over the constant predictor's:
    the share of the targets' variance that lies within questions. A head can go below it only by
    telling a question's good steps from its bad ones; knowing which questions are easy, however
    well, stops there (round 1 of `make learn` at 96 problems: 0.835, so an MSE ratio of 0.8 is out
    of reach of difficulty alone, session 31). None without targets; 1.0 when they are all equal."""
    flat = [y for ys in per_tree_targets for y in ys]
    if not flat:
        return None
    _, cm = constant_predictor(flat)
    within = sum(mse([sum(ys) / len(ys)] * len(ys), ys) * len(ys) for ys in per_tree_targets if ys) / len(flat)
    return within / cm if cm else 1.0


def per_question(rows: Sequence[Sequence[tuple[float, bool, str]]]) -> dict:
    """Within-question metrics from each tree's answers as (value, correct, answer text).

    Ties are counted in expectation (a random pick among the tied), so a constant head scores
    best_of_n == random_pick and within_auc 0.5 exactly. `oracle`, the share of trees holding a
    right answer, is the ceiling of any selection rule on the same answers: the gap between it and
    best_of_n is what a better head could win without a better policy. Trees without answers are
    left out."""
    rows = [r for r in rows if r]
    aucs = [a for a in (roc_auc([v for v, _, _ in r], [c for _, c, _ in r]) for r in rows) if a is not None]

    def expected_correct(group) -> float:
        return sum(c for _, c, _ in group) / len(group)

    best, rand, vote = [], [], []
    for r in rows:
        top = max(v for v, _, _ in r)
        best.append(expected_correct([x for x in r if x[0] == top]))
        rand.append(expected_correct(r))
        counts: dict[str, list] = {}
        for x in r:
            counts.setdefault(x[2], []).append(x)
        most = max(len(g) for g in counts.values())  # tied groups are the same size, so pooling them
        vote.append(expected_correct([x for g in counts.values() if len(g) == most for x in g]))  # is their mean
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"within_auc": mean(aucs), "within_trees": len(aucs), "best_of_n": mean(best),
            "random_pick": mean(rand), "majority": mean(vote),
            "oracle": mean([float(any(c for _, c, _ in r)) for r in rows])}


def scored_nodes(tree: Tree, outcomes: dict[int, float] | None = None) -> tuple[list[int], list[int]]:
    """Ids of the answer nodes whose correctness is known, and of the visited non-root steps with
    a finished path below them (those have a value target, Tree.outcome_values). The root (the
    question alone) is left out: training never supervises a value there. `outcomes`: the tree's
    outcome_values, when the caller has them already."""
    answers = [n.id for n in tree.nodes if n.terminal_reason == "answer" and n.correct is not None]
    outcomes = tree.outcome_values() if outcomes is None else outcomes
    steps = [n.id for n in tree.nodes if n.id != 0 and n.N > 0 and n.id in outcomes]
    return answers, steps


def _score_by_depth(tree: Tree, ids: list[int], value: Value, batch: int) -> dict[int, float]:
    """The head's value at nodes `ids`, scored a depth at a time after the root (whose value is not
    used): a state is scored once its parent's text is in the engine's prefix cache, so each token of
    the tree is computed once. Scored in id order, a tree's states went into one call whose rows each
    recomputed the question's prompt and every step above them (3.4x the tokens on 12 of
    `make learn`'s trees, session 30)."""
    depth = lambda i: tree.nodes[i].depth  # noqa: E731
    got: dict[int, float] = {}
    for _, level in itertools.groupby(sorted(set(ids) | {0}, key=lambda i: (depth(i), i)), key=depth):
        level = list(level)
        for s in range(0, len(level), batch):
            chunk = level[s:s + batch]
            for i, v in zip(chunk, value.score([tree.state(i) for i in chunk])):
                got[i] = float(v)
    return {i: got[i] for i in ids}


def value_report(trees: Iterable[Tree], value: Value, bins: int = 10, batch: int = 64,
                 check: Callable[[str | None, str], bool] | None = None,
                 progress: Callable[[int], None] | None = None) -> ValueReport:
    """Score every answer node and every visited step of each tree with `value` (fresh states,
    never the values stored in the tree) and measure AUC, MSE against the value target and
    calibration."""
    preds_a, labels_a, preds_s, targets_s, per_tree = [], [], [], [], []
    n_trees = 0
    fixed = getattr(value, "constant", None)  # a head that says one value everywhere needs no forward
    for tree in trees:
        n_trees += 1
        if check is not None and tree.ground_truth is not None:  # grade answers the tree left ungraded
            for n in tree.nodes:
                if n.terminal_reason == "answer" and n.correct is None:
                    n.correct = bool(check(n.answer, tree.ground_truth))
        target = tree.outcome_values()
        answers, steps = scored_nodes(tree, target)
        ids = sorted(set(answers) | set(steps))
        got = {i: float(fixed) for i in ids} if fixed is not None else _score_by_depth(tree, ids, value, batch)
        row = {"question_id": tree.question_id, "answers": [], "steps": []}
        for i in answers:
            preds_a.append(got[i])
            labels_a.append(bool(tree.nodes[i].correct))
            row["answers"].append([got[i], bool(tree.nodes[i].correct), tree.nodes[i].answer or ""])
        for i in steps:
            preds_s.append(got[i])
            targets_s.append(target[i])
            row["steps"].append([got[i], target[i]])
        per_tree.append(row)
        if progress:
            progress(n_trees)
    auc = roc_auc(preds_a, labels_a) if preds_a else None
    m = mse(preds_s, targets_s) if preds_s else None
    c, cm = constant_predictor(targets_s) if targets_s else (None, None)
    ratio = (m / cm if cm else (math.inf if m else 1.0)) if m is not None and cm is not None else None
    rel = reliability(preds_a, labels_a, bins)
    ci = auc_interval([[(v, c) for v, c, _ in row["answers"]] for row in per_tree]) if auc is not None else None
    return ValueReport(trees=n_trees, answers=len(preds_a), answers_correct=sum(labels_a), auc=auc,
                       steps=len(preds_s), mse=m, constant=c, constant_mse=cm, mse_ratio=ratio,
                       ece=expected_calibration_error(rel), reliability=rel, per_tree=per_tree,
                       question_ratio=question_ratio([[y for _, y in row["steps"]] for row in per_tree]),
                       auc_lo=ci[0] if ci else None, auc_hi=ci[1] if ci else None,
                       **per_question([row["answers"] for row in per_tree]))


def plot_reliability(report: ValueReport, path: str, title: str = "value head reliability") -> None:
    """Reliability diagram (PNG): observed share correct against predicted probability per bin."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = [b for b in report.reliability if b["n"]]
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    if bins:
        ax.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], "o-", label="value head")
        for b in bins:
            ax.annotate(str(b["n"]), (b["predicted"], b["observed"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    auc = "n/a" if report.auc is None else f"{report.auc:.3f}"
    ratio = "n/a" if report.mse_ratio is None else f"{report.mse_ratio:.3f}"
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted P(correct) = (value + 1) / 2",
           ylabel="observed share correct", title=f"{title}\nAUC {auc}, MSE/constant {ratio}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
