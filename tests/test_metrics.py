"""Value-head and paired-comparison metrics on hand-built inputs with known answers."""
import math

import pytest

from alphamath.metrics import (auc_interval, constant_predictor, expected_calibration_error, mse, paired_bootstrap,
                               reliability, roc_auc, sign_test, value_report)
from alphamath.steps import Step
from alphamath.tree import Tree
from search_svc.mcts import backup
from tests.fakes import ConstValue


def test_auc_perfect_reversed_constant_and_ties():
    assert roc_auc([0.9, 0.8, -0.1, -0.5], [True, True, False, False]) == 1.0
    assert roc_auc([-0.9, -0.8, 0.1, 0.5], [True, True, False, False]) == 0.0
    assert roc_auc([0.0] * 5, [True, False, True, False, False]) == 0.5
    # pairs (pos, neg): (0.5, 0.2) win, (0.5, 0.5) tie, (0.1, 0.2) loss, (0.1, 0.5) loss -> 1.5 / 4
    assert roc_auc([0.5, 0.1, 0.2, 0.5], [True, True, False, False]) == pytest.approx(0.375)
    assert roc_auc([0.3, 0.4], [True, True]) is None  # one class only: undefined
    with pytest.raises(ValueError):
        roc_auc([0.1], [True, False])


def test_constant_predictor_is_the_mean_and_its_mse_the_variance():
    c, m = constant_predictor([1.0, -1.0, -1.0, -1.0])
    assert c == -0.5 and m == pytest.approx(0.75)
    assert mse([c] * 4, [1.0, -1.0, -1.0, -1.0]) == pytest.approx(m)
    assert mse([0.0] * 4, [1.0, -1.0, -1.0, -1.0]) == 1.0  # a zero head is no better than the mean


def test_reliability_bins_and_ece():
    bins = reliability([-0.9, -0.8, 0.9, 0.95], [False, True, True, True], bins=2)
    assert [b["n"] for b in bins] == [2, 2]
    assert bins[0]["predicted"] == pytest.approx((0.05 + 0.1) / 2) and bins[0]["observed"] == 0.5
    assert bins[1]["predicted"] == pytest.approx((0.95 + 0.975) / 2) and bins[1]["observed"] == 1.0
    ece = expected_calibration_error(bins)
    assert ece == pytest.approx((2 * abs(0.075 - 0.5) + 2 * abs(0.9625 - 1.0)) / 4)
    assert reliability([1.0], [True], bins=4)[-1]["n"] == 1  # value 1.0 falls in the last bin


def test_sign_test_exact_p_values():
    r = sign_test([False] * 6 + [True] * 4, [True] * 6 + [True] * 4)
    assert (r["a_only"], r["b_only"]) == (0, 6) and r["p_value"] == pytest.approx(2 / 64)
    assert r["p_a_worse"] == pytest.approx(1 / 64)
    r = sign_test([True] + [False] * 7, [False] + [True] * 7)  # 1 vs 7: one-sided (1 + 8) / 256
    assert r["p_a_worse"] == pytest.approx(9 / 256) and r["p_value"] == pytest.approx(18 / 256)
    assert sign_test([True] * 7 + [False], [False] * 7 + [True])["p_a_worse"] == pytest.approx(1 - 1 / 256)
    assert sign_test([True, False], [True, False])["p_value"] == 1.0  # no discordant pair
    r = sign_test([True, False, True], [False, True, False])  # 2 vs 1: p = 2 * (1 + 3) / 8 = 1
    assert r["p_value"] == 1.0


def test_paired_bootstrap_mean_and_interval():
    a, b = [1, 1, 1, 0, 1, 1], [0, 1, 0, 0, 1, 0]
    r = paired_bootstrap(a, b, resamples=2000, seed=1)
    assert r["diff"] == pytest.approx(0.5)
    assert 0 <= r["lo"] <= 0.5 <= r["hi"] <= 1 and r["p_below_zero"] == 0.0  # a never looks worse
    same = paired_bootstrap([1, 0, 1], [1, 0, 1], resamples=100)
    assert same["diff"] == same["lo"] == same["hi"] == 0.0


def _tree() -> Tree:
    """root -> a -> {right (correct), wrong}; root -> b (wrong answer). Backed up as search would."""
    t = Tree(question="q", prompt="P<step>", ground_truth="7", question_id="q1")
    a = t.add_child(0, Step("think", "text"), 0.5)
    right = t.add_child(a.id, Step("so \\boxed{7}", "answer", answer="7"), 0.5)
    wrong = t.add_child(a.id, Step("so \\boxed{5}", "answer", answer="5"), 0.5)
    b = t.add_child(0, Step("thus \\boxed{4}", "answer", answer="4"), 0.5)
    for n, ok in ((right, True), (wrong, False), (b, False)):
        n.terminal_reason, n.correct, n.value = "answer", ok, 1.0 if ok else -1.0  # stored rewards
        backup(t, n.id, 1.0 if ok else -1.0)
    backup(t, a.id, 0.2)
    return t


def test_value_report_of_a_zero_head_reads_auc_half_and_ratio_at_least_one():
    rep = value_report([_tree()], ConstValue(0.0))
    assert (rep.trees, rep.answers, rep.answers_correct, rep.steps) == (1, 3, 1, 4)
    assert rep.auc == 0.5
    assert rep.mse_ratio >= 1.0
    # targets: a's mean outcome (1 - 1) / 2 = 0 (not its Q, (1 - 1 + 0.2) / 3, which averages in the
    # head's own 0.2), right 1, wrong -1, b -1
    targets = [0.0, 1.0, -1.0, -1.0]
    assert rep.mse == pytest.approx(sum(t * t for t in targets) / 4)
    assert rep.constant_mse == pytest.approx(constant_predictor(targets)[1])


def test_question_ratio_is_the_share_of_the_targets_variance_within_trees():
    from alphamath.metrics import question_ratio
    # mean -0.5: constant MSE (2.25 + 3 * 0.25) / 4 = 0.75; within the trees (1 + 1 + 0 + 0) / 4 = 0.5
    assert question_ratio([[1.0, -1.0], [-1.0, -1.0]]) == pytest.approx(0.5 / 0.75)
    assert question_ratio([[0.5], [-0.5], [1.0, 1.0]]) == 0.0  # nothing varies within a tree
    assert question_ratio([[1.0, -1.0, 0.0]]) == pytest.approx(1.0)  # one tree: all of it is within
    assert question_ratio([[-1.0, -1.0], [-1.0]]) == 1.0 and question_ratio([[], []]) is None
    rep = value_report([_tree(), _tree()], ConstValue(0.0))  # two copies of one tree: nothing between them
    assert rep.question_ratio == pytest.approx(1.0)


def test_a_head_that_declares_itself_constant_is_judged_without_a_forward_pass():
    scored, fixed = ConstValue(-0.3), ConstValue(-0.3)
    fixed.constant = -0.3  # as LocalValue says of a head whose weights are all zero
    a, b = value_report([_tree()], scored), value_report([_tree()], fixed)
    assert scored.calls == 5 and fixed.calls == 0  # 4 states, after the root (scored first for its cache)
    assert (a.auc, a.mse, a.mse_ratio, a.per_tree) == (b.auc, b.mse, b.mse_ratio, b.per_tree)


def test_value_report_scores_states_and_never_reads_stored_rewards():
    oracle = ConstValue(-0.5, by_text={"boxed{7}": 0.9})
    rep = value_report([_tree()], oracle)
    assert rep.auc == 1.0 and oracle.calls == 5  # every answer and visited step scored afresh, after the root
    # a head that predicts each stored reward would have MSE 0 at the answers; this one does not
    assert rep.mse > 0 and rep.mse_ratio < 1.0
    assert [len(rep.per_tree[0]["answers"]), len(rep.per_tree[0]["steps"])] == [3, 4]
    assert rep.within_auc == 1.0 and rep.within_trees == 1 and rep.best_of_n == 1.0 and rep.random_pick < 1.0
    assert rep.oracle == 1.0
    assert not math.isnan(rep.ece)


def test_per_question_metrics_on_hand_built_answers():
    from alphamath.metrics import per_question
    a = [(0.9, True, "7"), (0.1, False, "8"), (0.0, False, "8")]   # head ranks the right answer first
    b = [(0.5, False, "3"), (-0.2, True, "4"), (0.5, True, "4")]   # a tie at the top: half right
    c = [(0.3, False, "1"), (0.2, False, "2")]                      # no right answer: no AUC
    m = per_question([a, b, c, []])
    # AUC: a 1.0; b: positives -0.2 and 0.5 against 0.5 -> (0 + 0.5) / 2 = 0.25; mean 0.625 over 2 trees
    assert m["within_auc"] == pytest.approx(0.625) and m["within_trees"] == 2
    assert m["best_of_n"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert m["random_pick"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    # majority: a -> "8" (wrong); b -> "4" (right); c -> a tie of "1" and "2", both wrong
    assert m["majority"] == pytest.approx(1 / 3)
    assert m["oracle"] == pytest.approx(2 / 3)  # a and b hold a right answer, c does not


def test_a_constant_head_picks_at_random_and_reads_half_within_questions():
    from alphamath.metrics import per_question
    rows = [[(0.0, True, "1"), (0.0, False, "2"), (0.0, False, "2"), (0.0, False, "3")],
            [(0.0, True, "5"), (0.0, True, "5"), (0.0, False, "6")]]
    m = per_question(rows)
    assert m["within_auc"] == 0.5 and m["best_of_n"] == pytest.approx(m["random_pick"])
    assert m["majority"] == pytest.approx((0.0 + 1.0) / 2)
    assert m["oracle"] == 1.0 and m["best_of_n"] < m["oracle"]  # both trees hold a right answer
    assert per_question([]) == {"within_auc": None, "within_trees": 0, "best_of_n": None,
                                "random_pick": None, "majority": None, "oracle": None}


def test_value_report_computes_each_token_of_a_tree_once(tiny_model_dir):
    """On the prefix-cached engine, value_report scores parents before children, so the question's
    prompt and each step are computed once, and every value equals that state scored on its own."""
    import torch

    from alphamath.lm import LocalLM
    from alphamath.local import LocalValue
    from alphamath.steps import render_prompt

    def engine():
        lm = LocalLM(tiny_model_dir, dtype="fp32")
        torch.manual_seed(0)
        torch.nn.init.normal_(lm.model.value_head.weight, std=0.5)  # a head that says something
        return lm

    lm = engine()
    t = Tree(question="Ann has 3 apples and buys 4 more. How many?", ground_truth="7", question_id="q1",
             prompt=render_prompt("Ann has 3 apples and buys 4 more. How many?", lm.tokenizer))
    a = t.add_child(0, Step("Ann starts with 3 apples and buys 4 more.", "text"), 0.5)
    b = t.add_child(0, Step("We add the apples.", "text"), 0.5)
    a2 = t.add_child(a.id, Step("She now has 3 + 4 apples.", "text"), 0.5)
    leaves = [(t.add_child(a2.id, Step("So \\boxed{7}", "answer", answer="7"), 0.5), True),
              (t.add_child(a2.id, Step("So \\boxed{8}", "answer", answer="8"), 0.5), False),
              (t.add_child(b.id, Step("Thus \\boxed{12}", "answer", answer="12"), 0.5), False)]
    for n, ok in leaves:
        n.terminal_reason, n.correct = "answer", ok
        backup(t, n.id, 1.0 if ok else -1.0)

    rep = value_report([t], LocalValue(lm))
    scored = [n.id for n in t.nodes[1:]]
    unique = len(lm.encode(t.state(0))) + sum(
        len(lm.encode(t.state(i))) - len(lm.encode(t.state(t.nodes[i].parent))) for i in scored)
    assert unique > 300 and rep.steps == len(scored)  # the prompt dominates: recomputing it would show
    assert lm.usage.prefill_tokens <= unique + len(scored)  # a token per state where text joins a step

    alone = engine()  # each state on an empty cache
    got = dict(zip(scored, (v for v, _ in rep.per_tree[0]["steps"])))  # steps: every visited node, by id
    for i in scored:
        alone.cache.clear()
        assert alone.score([t.state(i)])[0] == pytest.approx(got[i], abs=1e-4)


def test_auc_interval_resamples_whole_trees():
    # every tree ranks its right answer above its wrong one: each resample reads AUC 1.0
    perfect = [[(0.9, True), (-0.9, False)]] * 5
    assert auc_interval(perfect) == (1.0, 1.0)
    # one tree reversed among four: the interval holds the pooled AUC and is narrower with more trees
    mixed = [[(0.5, True), (-0.5, False)]] * 3 + [[(-0.6, True), (0.6, False)]]
    lo, hi = auc_interval(mixed)
    pooled = roc_auc([v for t in mixed for v, _ in t], [c for t in mixed for _, c in t])
    assert lo <= pooled <= hi and lo < hi
    lo4, hi4 = auc_interval(mixed * 4)
    assert hi4 - lo4 < hi - lo
    assert auc_interval([[(0.1, True)], [(0.2, True)]]) is None  # one class: AUC undefined everywhere
    assert auc_interval([]) is None
