"""tests.sbs_choices' summary on hand-built rows with known answers."""
import pytest

from tests.sbs_choices import summary


def test_summary_counts_the_chosen_depths_and_compares_depth_one_answers_with_open_steps():
    rows = {
        "a": {"correct": True, "depth": 1, "opens": [[1, -0.8], [2, -0.5]],
              "answers": [{"depth": 1, "value": 0.2, "correct": True, "answer": "4"},
                          {"depth": 1, "value": -0.4, "correct": False, "answer": "5"}]},
        "b": {"correct": False, "depth": None, "opens": [[1, -0.6]], "answers": []},
        "c": {"correct": False, "depth": 2, "opens": [],
              "answers": [{"depth": 2, "value": 0.0, "correct": False, "answer": "7"}]},
    }
    s = summary(rows)
    assert s["solved"] == 1 and s["n"] == 3
    assert s["chosen_depth"] == {"1": 1, "None": 1, "2": 1}
    assert s["depth1_answer_value"] == pytest.approx(-0.1)  # (0.2 - 0.4) / 2: depth-2 answers left out
    assert s["depth1_open_value"] == pytest.approx(-0.7)    # (-0.8 - 0.6) / 2
    assert s["within_auc"] == 1.0 and s["within_trees"] == 1  # only tree a holds both kinds
    assert s["oracle"] == pytest.approx(0.5)                  # trees with answers: a (right), c (wrong)
    assert s["solved_by_distinct_steps"] is None              # rows without the other rule's answer (greedy)
    for r, got in zip(rows.values(), (False, False, True)):
        r["distinct_correct"] = got
    assert summary(rows)["solved_by_distinct_steps"] == 1


def test_weighted_vote_sums_each_answers_chance_and_is_majority_under_a_constant_head():
    from tests.sbs_choices import weighted_vote
    answers = [(-0.9, False, "5"), (-0.9, False, "5"), (0.9, True, "4")]
    assert weighted_vote(answers) == 1.0                      # 0.95 for "4" against 0.05 + 0.05 for "5"
    flat = [(0.0, False, "5"), (0.0, False, "5"), (0.0, True, "4")]
    assert weighted_vote(flat) == 0.0                         # 1.0 against 0.5: majority
    assert weighted_vote([(0.0, True, "4"), (0.0, False, "5")]) == 0.5  # a tie is a random pick
    assert weighted_vote([]) is None


def test_anchored_expansion_puts_the_greedy_step_first_and_merges_a_sample_equal_to_it():
    from alphamath.search_config import SearchConfig
    from alphamath.tree import Tree
    from tests.fakes import ScriptedPolicy, ScriptedSandbox, sample
    from tests.sbs_choices import anchored_expand

    policy = ScriptedPolicy({}, default=[sample("A.</step>"), sample("B.</step>"), sample("C.</step>")])
    tree = Tree(question="q", prompt="P<step>")
    groups = anchored_expand(tree, [0], 3, policy, ScriptedSandbox(), SearchConfig(temperature=0.6))
    assert [(n, t) for _, n, t in policy.calls] == [(1, 0.0), (2, 0.6)]  # one greedy step, B2 - 1 samples
    assert [c.text for c in groups[0]] == ["A.", "B."]  # the sampled "A." is the greedy child already
