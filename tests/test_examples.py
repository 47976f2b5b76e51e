"""Training-example extraction from finished trees (the paper's rules)."""
from __future__ import annotations

import pytest

from alphamath.steps import Step
from alphamath.tree import Tree
from search_svc.mcts import backup
from tests.pipeline import answer_step, make_tree
from trainer_svc.examples import Example, extract_examples, tree_hash


def test_paths_are_labelled_and_carry_each_steps_q():
    t = make_tree(answers=("4", "5"))
    exs = extract_examples(t)
    assert [e.correct for e in exs] == [True, False]
    right, wrong = exs
    # The shared code step was visited twice (+1 and -1): Q = 0; the leaves carry their rewards.
    assert right.values == (0.0, 1.0) and wrong.values == (0.0, -1.0)
    assert right.steps[0].startswith("Add them.<code>\nprint(2+2)\n</code>\n<output>\n4\n</output>")
    assert right.text == t.state(2)  # exactly the state the value head scored during search
    assert right.step_end_chars() == [len(t.state(1)), len(t.state(2))]


def test_value_targets_are_mean_outcomes_not_the_heads_own_backups():
    t = Tree(question="q", prompt="P<step>", ground_truth="7", question_id="q1")
    a = t.add_child(0, Step("think", "text"), 0.5)
    right = t.add_child(a.id, answer_step("7"), 0.5)
    wrong = t.add_child(a.id, answer_step("5"), 0.5)
    bad = t.add_child(a.id, Step("garbage", "malformed"), 0.5)
    open_ = t.add_child(a.id, Step("more", "text"), 0.5)       # expanded, never finished
    ungraded = t.add_child(0, answer_step("9"), 0.5)            # an answer nobody graded
    for n, reason, ok, r in ((right, "answer", True, 1.0), (wrong, "answer", False, -1.0), (bad, "malformed", None, -1.0)):
        n.terminal_reason, n.correct = reason, ok
        backup(t, n.id, r)
    backup(t, open_.id, 0.0)  # a zero head's estimate: what pulls Q towards 0
    ungraded.terminal_reason = "answer"
    assert a.Q == pytest.approx(-1 / 4)
    out = t.outcome_values()
    assert out == {0: pytest.approx(-1 / 3), a.id: pytest.approx(-1 / 3), right.id: 1.0, wrong.id: -1.0, bad.id: -1.0}
    assert {e.correct: e.values for e in extract_examples(t)}[True] == (pytest.approx(-1 / 3), 1.0)
    from tests.q_targets import counts
    c = counts([t])  # a: Q -1/4 (the zero head's 0 averaged in), the finished paths below it -1/3
    assert (c["right_answers"], c["wrong_answers"], c["open_steps"], c["open_with_outcome"]) == (1, 1, 2, 1)
    assert c["their_q"] == pytest.approx(-1 / 4) and c["their_outcome"] == pytest.approx(-1 / 3)
    assert (c["sibling_groups"], c["open_above_wrong_answer"]) == (1, 1)  # "more" (Q 0) above the wrong answer


def test_unfinished_leaves_and_failed_terminals():
    t = make_tree(answers=("4",))
    open_leaf = t.add_child(0, Step("Think.", "text"), prior=0.1)  # never expanded: no label
    backup(t, open_leaf.id, 0.2)
    bad = t.add_child(0, Step("garbage", "malformed"), prior=0.1)
    bad.terminal_reason = "malformed"
    backup(t, bad.id, -1.0)
    exs = extract_examples(t)
    assert sorted((e.steps[-1][:7], e.correct) for e in exs) == [("So the ", True), ("garbage", False)]


def test_all_code_failed_paths_are_dropped_but_partial_failures_kept():
    t = make_tree(answers=("4",), code_error_path=True)
    assert [e.correct for e in extract_examples(t)] == [True]
    # one failed code step followed by a working one: kept
    fail = t.add_child(0, Step("Try.", "code", code="x", output="NameError", code_error=True), 0.2)
    ok = t.add_child(fail.id, Step("Fix.", "code", code="print(4)", output="4"), 0.2)
    leaf = t.add_child(ok.id, answer_step("4"), 0.2)
    leaf.terminal_reason, leaf.correct = "answer", True
    backup(t, leaf.id, 1.0)
    assert [e.correct for e in extract_examples(t)] == [True, True]


def test_at_most_four_correct_and_four_wrong_duplicates_removed_and_reproducible():
    t = make_tree(answers=tuple(["4"] * 3 + ["1", "2", "3", "5", "6", "7"]))
    # three identical correct leaves under the same parent are one path
    for extra in ("8", "9"):
        s = t.add_child(0, Step(f"Guess {extra}.", "text"), 0.1)
        for a in ("4", "4b"):
            leaf = t.add_child(s.id, answer_step(a), 0.1)
            leaf.terminal_reason, leaf.correct = "answer", a == "4"
            backup(t, leaf.id, 1.0 if leaf.correct else -1.0)
    exs = extract_examples(t)
    correct = [e for e in exs if e.correct]
    wrong = [e for e in exs if not e.correct]
    assert len(correct) == 3  # "4" under the code step (deduplicated) + one under each guess
    assert len(wrong) == 4    # 6 + 2 = 8 distinct wrong paths, capped
    assert len({e.key for e in exs}) == len(exs)
    assert [e.key for e in extract_examples(t)] == [e.key for e in exs]  # same sample every time
    assert extract_examples(t, max_correct=1, max_wrong=0) and len(extract_examples(t, 1, 0)) == 1


def test_no_ground_truth_no_examples_and_round_trip():
    t = make_tree()
    t.ground_truth = None
    assert extract_examples(t) == []
    ex = extract_examples(make_tree())[0]
    assert Example.from_dict(ex.to_dict()) == ex
    with pytest.raises(ValueError, match="value targets"):
        Example("q", "p", ("a",), (), True)


def test_tree_hash_ignores_meta_but_not_content():
    a, b = make_tree(), make_tree()
    b.meta["seconds"] = 12.5
    assert tree_hash(a) == tree_hash(b)
    b.nodes[1].W += 1
    assert tree_hash(a) != tree_hash(b)
    assert isinstance(Tree.from_json(a.to_json()), Tree)


def test_paths_are_capped_per_question_over_all_its_trees_and_held_out_questions_never_train():
    from trainer_svc.examples import Example, cap_per_question, held_out
    from trainer_svc.train import TrainConfig, training_examples

    def ex(q, i, ok):
        return Example(question_id=q, prompt="P", steps=(f"s{i}",), values=(1.0 if ok else -1.0,), correct=ok)
    pool = [ex("q1", i, i % 3 == 0) for i in range(12)] + [ex("q3", i, False) for i in range(3)]
    capped = cap_per_question(pool, max_correct=2, max_wrong=3)
    per = {(q, c): sum(1 for e in capped if (e.question_id, e.correct) == (q, c)) for q in ("q1", "q3") for c in (True, False)}
    assert per == {("q1", True): 2, ("q1", False): 3, ("q3", True): 0, ("q3", False): 3}
    assert cap_per_question(pool, 2, 3) == capped  # reproducible
    share = 0.5
    held = {q for q in ("q1", "q3") if held_out(q, share)}
    kept = training_examples(pool, TrainConfig(value_holdout=share))
    assert {e.question_id for e in kept} == {"q1", "q3"} - held
    assert not held_out("q1", 0.0)
