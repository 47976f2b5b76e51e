"""The committed stubs match proto/, and the event/sample conversions are exact."""
from __future__ import annotations

import json
import math
from dataclasses import fields
from datetime import datetime, timezone

import pytest

from alphamath import convert, protogen
from alphamath.interfaces import Sample
from alphamath.pb import events_pb2, policy_pb2, search_pb2
from alphamath.steps import Step
from alphamath.tree import Node, Tree


def test_generated_stubs_are_not_stale():
    stale = protogen.stale_files()
    assert stale == [], f"run `make proto`: stale stubs {stale}"


def test_stubs_import_package_relative(tmp_path):
    written = protogen.generate(tmp_path)
    assert {p.name for p in written} >= {"policy_pb2.py", "policy_pb2_grpc.py", "events_pb2.py", "__init__.py"}
    for p in written:
        assert "from alphamath.v1 import" not in p.read_text(), p.name


def _tree() -> Tree:
    t = Tree(question="What is 2+3?", prompt="SYSTEM...<step>", ground_truth="5", question_id="gsm8k-7",
             meta={"method": "mcts", "config": {"iterations": 4, "c_puct": 1.25}, "checkpoint": "round-1",
                   "timings": {"total_s": 0.123456789}, "unicode": "√2 ≈ 1.414"})
    a = t.add_child(0, Step("Add them.\n", "code", code="print(2+3)", output="5\n"), prior=0.8123456789,
                    token_count=17)
    b = t.add_child(0, Step("It is 6.", "answer", answer="6"), prior=0.1 + 0.2, token_count=5, share=0.4)
    c = t.add_child(a.id, Step("So \\boxed{5}.", "answer", answer="5"), prior=1 / 3, token_count=8)
    t.add_child(a.id, Step("", "malformed"), prior=1e-300, token_count=0)
    a.value, b.value, c.value = -0.25, -1.0, 1.0
    b.terminal_reason, b.correct = "answer", False
    c.terminal_reason, c.correct = "answer", True
    t.nodes[4].terminal_reason = "malformed"
    t.nodes[4].code_error = True
    for n, (N, W) in zip(t.nodes, [(3, 0.5), (2, 1.75), (1, -1.0), (1, 1.0), (0, 0.0)]):
        n.N, n.W = N, W
    return t


def test_tree_event_round_trip_is_exact():
    tree = _tree()
    when = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)
    ev = convert.tree_to_event(tree, event_id="e1", created_at=when)
    wire = ev.SerializeToString()
    back = convert.tree_from_event(events_pb2.TreeEvent.FromString(wire))
    assert back.to_dict() == tree.to_dict()
    assert back.nodes == tree.nodes  # dataclass equality: every Node field, None vs 0 included
    assert ev.checkpoint == "round-1"
    assert json.loads(ev.search_config_json) == {"iterations": 4, "c_puct": 1.25}
    assert ev.created_at.ToDatetime(tzinfo=timezone.utc) == when
    assert ev.nodes[1].q == pytest.approx(0.875) and ev.nodes[1].visits == 2
    assert not ev.nodes[0].HasField("parent") and ev.nodes[1].parent == 0


def test_a_tree_event_from_before_the_share_field_reads_one_sample_a_node():
    ev = convert.tree_to_event(_tree(), event_id="e1")
    for m in ev.nodes:
        m.ClearField("share")
    back = convert.tree_from_event(events_pb2.TreeEvent.FromString(ev.SerializeToString()))
    assert [n.share for n in back.nodes] == [1.0] * len(back.nodes)
    assert convert.tree_from_event(convert.tree_to_event(_tree())).nodes[2].share == 0.4


def test_tree_event_covers_every_node_field():
    names = {f.name for f in fields(Node)}
    pb_names = {fd.name for fd in events_pb2.TreeNode.DESCRIPTOR.fields}
    assert {convert._NODE_RENAME.get(n, n) for n in names} <= pb_names


def test_tree_event_without_optional_tree_fields():
    tree = Tree(question="q", prompt="p")
    back = convert.tree_from_event(convert.tree_to_event(tree, checkpoint="c0", search_config={}))
    assert back.question_id is None and back.ground_truth is None and back.meta == {}
    assert back.to_dict() == tree.to_dict()


def test_tree_event_rejects_other_schema_and_broken_trees():
    ev = convert.tree_to_event(_tree())
    ev.schema_version = 99
    with pytest.raises(ValueError, match="schema_version"):
        convert.tree_from_event(ev)
    ev = convert.tree_to_event(_tree())
    ev.nodes[1].children.append(42)
    with pytest.raises(ValueError, match="does not exist"):
        convert.tree_from_event(ev)
    with pytest.raises(ValueError, match="no nodes"):
        convert.tree_from_event(events_pb2.TreeEvent(schema_version=1))


def test_sample_round_trip():
    for reason in ("stop", "eos", "length"):
        s = Sample(text="x = 1</code>", token_count=7, cumulative_logprob=-math.pi, finish_reason=reason)
        assert convert.sample_from_pb(policy_pb2.Sample.FromString(convert.sample_to_pb(s).SerializeToString())) == s
    with pytest.raises(ValueError):
        convert.sample_to_pb(Sample("", 0, 0.0, "cancelled"))
    with pytest.raises(ValueError):
        convert.sample_from_pb(policy_pb2.Sample())


def test_every_search_setting_travels_in_search_parameters():
    """SearchParameters mirrors alphamath.search_config.SearchConfig: a client can set every field
    (batched MCTS's leaves_per_call included), and a non-default config survives the round trip."""
    from dataclasses import asdict, fields

    from alphamath.search_config import SearchConfig
    names = {fd.name for fd in search_pb2.SearchParameters.DESCRIPTOR.fields}
    assert {f.name for f in fields(SearchConfig)} <= names
    cfg = {k: v for k, v in asdict(SearchConfig(leaves_per_call=4, iterations=12)).items()}
    assert convert.parameters_to_overrides(convert.parameters_to_pb(cfg))["leaves_per_call"] == 4


def test_search_parameters_only_set_fields():
    p = search_pb2.SearchParameters(iterations=0, c_puct=2.5, select_by=search_pb2.SELECT_BY_VISITS)
    assert convert.parameters_to_overrides(p) == {"iterations": 0, "c_puct": 2.5, "select_by": "visits"}
    assert convert.parameters_to_overrides(search_pb2.SearchParameters()) == {}
    cfg = {"iterations": 10, "n_children": 3, "temperature": 0.6, "select_by": "q", "seed": 7}
    assert convert.parameters_to_overrides(convert.parameters_to_pb(cfg)) == cfg
    with pytest.raises(ValueError, match="no field"):
        convert.parameters_to_pb({"bogus": 1})
    assert convert.method_from_pb(search_pb2.METHOD_SBS) == "sbs"
    with pytest.raises(ValueError, match="unknown search method"):
        convert.method_from_pb(search_pb2.METHOD_UNSPECIFIED)


def test_checkpoint_event():
    ev = convert.checkpoint_event("r1", "/ckpt/r1", 1, parent="embedded", metrics={"greedy_acc": 0.5})
    back = events_pb2.CheckpointEvent.FromString(ev.SerializeToString())
    assert (back.checkpoint_id, back.round, back.parent, dict(back.metrics)) == ("r1", 1, "embedded", {"greedy_acc": 0.5})
    assert back.promoted_at.seconds > 0
