"""Tree structure and field limits, checked before anything is stored or searched."""
from __future__ import annotations

import pytest

from alphamath.convert import check_tree_structure, tree_from_event, tree_to_event
from alphamath.limits import LimitError, check_id, check_text
from tests.pipeline import make_tree


def broken(mutate):
    t = make_tree("q1", code_error_path=True)  # root -> 1 -> (2, 3); root -> 4 -> 5
    mutate(t)
    return t


@pytest.mark.parametrize("mutate, message", [
    (lambda t: setattr(t.nodes[1], "parent", 2), "node 1 has parent 2, listed after it"),       # 1 <-> 2 cycle
    (lambda t: setattr(t.nodes[2], "parent", 2), "node 2 has parent 2, listed after it"),       # self-parent
    (lambda t: setattr(t.nodes[4], "parent", None), "node 4 has no parent"),                    # orphan
    (lambda t: setattr(t.nodes[3], "parent", 9), "node 3 has parent 9, which does not exist"),
    (lambda t: setattr(t.nodes[0], "parent", 1), "node 0 must be the root"),
    (lambda t: setattr(t.nodes[2], "depth", 5), "node 2 has depth 5"),
    (lambda t: t.nodes[0].children.append(2), "node 0 lists child 2, whose parent is 1"),
    (lambda t: t.nodes[1].children.append(2), "node 2 is listed as a child twice"),
    (lambda t: t.nodes[1].children.remove(3), "node 3 is not in its parent's children list"),
    (lambda t: t.nodes[1].children.append(7), "node 1 lists child 7, which does not exist"),
    (lambda t: setattr(t.nodes[5], "value", float("inf")), "node 5 value is inf"),
])
def test_malformed_trees_are_refused_with_the_reason(mutate, message):
    t = broken(mutate)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_tree_structure(t.nodes)
    with pytest.raises(ValueError, match="node"):  # the same through the event the trainer reads
        tree_from_event(tree_to_event(t, checkpoint="c"))


def test_a_well_formed_tree_round_trips():
    t = make_tree("q1", code_error_path=True)
    check_tree_structure(t.nodes)
    assert tree_from_event(tree_to_event(t, checkpoint="c")).to_dict() == t.to_dict()


def test_path_through_a_parent_cycle_raises_instead_of_looping():
    t = broken(lambda t: setattr(t.nodes[1], "parent", 2))
    with pytest.raises(ValueError, match="cycle"):
        t.path(2)


@pytest.mark.parametrize("value, message", [
    ("", "question_id is empty"),
    ("x" * 201, "question_id has 201 characters; the limit is 200"),
    ("a\nb", "question_id contains the control character '\\\\n'"),
    ("a\x00b", "question_id contains the control character '\\\\x00'"),
])
def test_ids_must_fit_the_store(value, message):
    with pytest.raises(LimitError, match=message):
        check_id("question_id", value)


def test_texts_may_hold_newlines_but_not_nul():
    assert check_text("question", "line 1\n\tline 2") == "line 1\n\tline 2"
    assert check_id("question_id", "gsm8k/train-17 é") == "gsm8k/train-17 é"
    with pytest.raises(LimitError, match="question contains the control character"):
        check_text("question", "2 + 2\x00")
    with pytest.raises(LimitError, match="ground_truth has 1001 characters"):
        check_text("ground_truth", "9" * 1001, 1000)
