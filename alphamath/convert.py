"""Conversions between the engine's Python types and the alphamath.v1 protobuf messages.

Tree <-> TreeEvent is an exact round trip (every Node field, the tree's meta), so the trainer
sees precisely the tree search built. Sample <-> proto maps finish reasons to the enum.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import fields
from datetime import datetime, timezone
from typing import Any, Mapping

from alphamath.interfaces import Sample
from alphamath.limits import (EVENT_ID_CHARS, GROUND_TRUTH_CHARS, MAX_TREE_NODES, QUESTION_CHARS, check_finite,
                              check_id, check_text)
from alphamath.pb import common_pb2, events_pb2, policy_pb2, search_pb2
from alphamath.tree import SCHEMA_VERSION, Node, Tree

# ---------------------------------------------------------------- samples

_FINISH_TO_PB = {
    "stop": policy_pb2.FINISH_REASON_STOP,
    "eos": policy_pb2.FINISH_REASON_EOS,
    "length": policy_pb2.FINISH_REASON_LENGTH,
}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}


def sample_to_pb(s: Sample) -> policy_pb2.Sample:
    if s.finish_reason not in _FINISH_TO_PB:
        raise ValueError(f"unknown finish_reason {s.finish_reason!r}")
    return policy_pb2.Sample(text=s.text, token_count=s.token_count,
                             cumulative_logprob=s.cumulative_logprob,
                             finish_reason=_FINISH_TO_PB[s.finish_reason])


def sample_from_pb(m: policy_pb2.Sample) -> Sample:
    if m.finish_reason not in _FINISH_FROM_PB:
        raise ValueError(f"sample has no finish_reason ({m.finish_reason})")
    return Sample(text=m.text, token_count=m.token_count,
                  cumulative_logprob=m.cumulative_logprob,
                  finish_reason=_FINISH_FROM_PB[m.finish_reason])


def completions_to_pb(results: list[list[Sample]]) -> list[policy_pb2.Completions]:
    return [policy_pb2.Completions(samples=[sample_to_pb(s) for s in per_prompt]) for per_prompt in results]


def model_info(loaded, **limits: int) -> common_pb2.ModelInfo:
    """The Info RPC's answer for what a policy or value server serves (its ModelSlot's record)."""
    return common_pb2.ModelInfo(model_id=loaded.model_id, checkpoint=loaded.checkpoint, checkpoint_path=loaded.path,
                                backend=loaded.backend, dtype=loaded.dtype, **limits)


def completions_from_pb(msg: policy_pb2.GenerateResponse) -> list[list[Sample]]:
    return [[sample_from_pb(s) for s in c.samples] for c in msg.completions]


# ---------------------------------------------------------------- search parameters

_SELECT_BY_TO_PB = {"q": search_pb2.SELECT_BY_Q, "value": search_pb2.SELECT_BY_VALUE,
                    "visits": search_pb2.SELECT_BY_VISITS}
_SELECT_BY_FROM_PB = {v: k for k, v in _SELECT_BY_TO_PB.items()}
METHODS = {search_pb2.METHOD_GREEDY: "greedy", search_pb2.METHOD_SBS: "sbs",
           search_pb2.METHOD_MCTS: "mcts", search_pb2.METHOD_MAJORITY: "majority"}
_METHOD_TO_PB = {v: k for k, v in METHODS.items()}


def method_from_pb(m: int) -> str:
    """Name of a search method; ValueError (-> INVALID_ARGUMENT) for unspecified/unknown."""
    if m not in METHODS:
        raise ValueError(f"unknown search method {m}; expected one of {sorted(_METHOD_TO_PB)}")
    return METHODS[m]


def method_to_pb(name: str) -> int:
    if name not in _METHOD_TO_PB:
        raise ValueError(f"unknown search method {name!r}; expected one of {sorted(_METHOD_TO_PB)}")
    return _METHOD_TO_PB[name]


def parameters_to_overrides(p: search_pb2.SearchParameters) -> dict[str, Any]:
    """Only the fields the client set, named as in alphamath.search_config.SearchConfig."""
    out: dict[str, Any] = {}
    for fd in p.DESCRIPTOR.fields:
        if fd.name == "select_by":
            if p.select_by != search_pb2.SELECT_BY_UNSPECIFIED:
                if p.select_by not in _SELECT_BY_FROM_PB:
                    raise ValueError(f"unknown select_by {p.select_by}")
                out["select_by"] = _SELECT_BY_FROM_PB[p.select_by]
        elif p.HasField(fd.name):
            out[fd.name] = getattr(p, fd.name)
    return out


def parameters_to_pb(config: Mapping[str, Any]) -> search_pb2.SearchParameters:
    """SearchParameters from a SearchConfig-like mapping (unknown keys are an error)."""
    p = search_pb2.SearchParameters()
    names = {fd.name for fd in p.DESCRIPTOR.fields}
    for k, v in config.items():
        if k not in names:
            raise ValueError(f"SearchParameters has no field {k!r}")
        if k == "select_by":
            if v not in _SELECT_BY_TO_PB:
                raise ValueError(f"select_by must be one of {sorted(_SELECT_BY_TO_PB)}")
            p.select_by = _SELECT_BY_TO_PB[v]
        elif v is not None:
            setattr(p, k, v)
    return p


# ---------------------------------------------------------------- trees

# Node attribute -> TreeNode field, where the names differ (proto names are lower case).
_NODE_RENAME = {"N": "visits", "W": "value_sum"}
_NODE_OPTIONAL = {"parent", "code", "output", "value", "terminal_reason", "answer", "correct"}
NODE_FIELDS = tuple(f.name for f in fields(Node))


def node_to_pb(n: Node) -> events_pb2.TreeNode:
    m = events_pb2.TreeNode(q=n.Q)
    for name in NODE_FIELDS:
        v = getattr(n, name)
        pb_name = _NODE_RENAME.get(name, name)
        if name == "children":
            m.children.extend(v)
        elif v is None:
            if name not in _NODE_OPTIONAL:
                raise ValueError(f"node {n.id}: field {name} must not be None")
        else:
            setattr(m, pb_name, v)
    return m


def node_from_pb(m: events_pb2.TreeNode) -> Node:
    kw = {}
    for name in NODE_FIELDS:
        pb_name = _NODE_RENAME.get(name, name)
        if name == "children":
            kw[name] = list(m.children)
        elif name in _NODE_OPTIONAL and not m.HasField(pb_name):
            kw[name] = None
        elif name == "share" and not m.HasField("share"):  # a tree from before the field: one sample each
            kw[name] = 1.0
        else:
            kw[name] = getattr(m, pb_name)
    return Node(**kw)


def _timestamp(when: datetime | None):
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.FromDatetime((when or datetime.now(timezone.utc)).astimezone(timezone.utc))
    return ts


def tree_to_event(tree: Tree, *, checkpoint: str | None = None, search_config: Mapping | None = None,
                  event_id: str | None = None, created_at: datetime | None = None) -> events_pb2.TreeEvent:
    """A finished tree as the event published on alphamath.trees.v1 (keyed by question_id).

    checkpoint / search_config default to tree.meta["checkpoint"] / tree.meta["config"].
    """
    if checkpoint is None:
        checkpoint = str(tree.meta.get("checkpoint") or "")
    if search_config is None:
        search_config = tree.meta.get("config") or {}
    for i, n in enumerate(tree.nodes):
        if n.id != i:
            raise ValueError(f"tree node at index {i} has id {n.id}")
    ev = events_pb2.TreeEvent(
        schema_version=SCHEMA_VERSION,
        event_id=event_id or uuid.uuid4().hex,
        question=tree.question,
        prompt=tree.prompt,
        checkpoint=checkpoint,
        search_config_json=json.dumps(dict(search_config), sort_keys=True),
        nodes=[node_to_pb(n) for n in tree.nodes],
        meta_json=json.dumps(tree.meta, sort_keys=True, ensure_ascii=False),
        created_at=_timestamp(created_at),
    )
    if tree.question_id is not None:
        ev.question_id = tree.question_id
    if tree.ground_truth is not None:
        ev.ground_truth = tree.ground_truth
    return ev


def check_tree_structure(nodes: list[Node]) -> None:
    """ValueError unless `nodes` form one tree rooted at node 0, every parent listed before its
    children. Why: a parent cycle makes Tree.path loop forever and an orphan's examples would
    have no question; both must be refused before the trainer stores or walks the tree.

    Checked: ids equal positions; node 0 is the root (no parent, depth 0); every other node's
    parent exists and comes earlier (which rules out cycles and self-parents); depth is the
    parent's + 1; each node appears in exactly its parent's children list, once; visit and
    token counts are non-negative and the floats finite."""
    if not nodes:
        raise ValueError("tree has no nodes (the root is required)")
    n_nodes = len(nodes)
    for i, n in enumerate(nodes):
        if n.id != i:
            raise ValueError(f"tree node at index {i} has id {n.id}")
        if i == 0:
            if n.parent is not None or n.depth != 0:
                raise ValueError(f"node 0 must be the root (parent none, depth 0); it has parent {n.parent}, "
                                 f"depth {n.depth}")
        else:
            if n.parent is None:
                raise ValueError(f"node {i} has no parent (an orphan; only node 0 is the root)")
            if not 0 <= n.parent < n_nodes:
                raise ValueError(f"node {i} has parent {n.parent}, which does not exist")
            if n.parent >= i:
                raise ValueError(f"node {i} has parent {n.parent}, listed after it (a cycle or out of order)")
            if n.depth != nodes[n.parent].depth + 1:
                raise ValueError(f"node {i} has depth {n.depth}; its parent {n.parent} has depth "
                                 f"{nodes[n.parent].depth}")
        if n.N < 0 or n.token_count < 0:
            raise ValueError(f"node {i} has a negative count (visits {n.N}, tokens {n.token_count})")
        for name in ("W", "prior", "value", "share"):
            try:
                check_finite(f"node {i} {name}", getattr(n, name))
            except ValueError as e:
                raise ValueError(str(e)) from None
    seen_as_child = [False] * n_nodes
    for i, n in enumerate(nodes):
        for c in n.children:
            if not 0 < c < n_nodes:
                raise ValueError(f"node {i} lists child {c}, which does not exist")
            if nodes[c].parent != i:
                raise ValueError(f"node {i} lists child {c}, whose parent is {nodes[c].parent}")
            if seen_as_child[c]:
                raise ValueError(f"node {c} is listed as a child twice")
            seen_as_child[c] = True
    missing = [i for i in range(1, n_nodes) if not seen_as_child[i]]
    if missing:
        raise ValueError(f"node {missing[0]} is not in its parent's children list "
                         f"({len(missing)} such node(s))")


def tree_from_event(ev: events_pb2.TreeEvent) -> Tree:
    """Inverse of tree_to_event; ValueError for an unsupported schema or an inconsistent tree."""
    if ev.schema_version != SCHEMA_VERSION:
        raise ValueError(f"unsupported TreeEvent schema_version {ev.schema_version} "
                         f"(this build reads {SCHEMA_VERSION})")
    if not ev.nodes:
        raise ValueError("TreeEvent has no nodes (the root is required)")
    if len(ev.nodes) > MAX_TREE_NODES:
        raise ValueError(f"TreeEvent has {len(ev.nodes)} nodes; the limit is {MAX_TREE_NODES}")
    nodes = [node_from_pb(m) for m in ev.nodes]
    check_tree_structure(nodes)
    if ev.HasField("question_id"):
        check_id("question_id", ev.question_id)
    check_id("checkpoint", ev.checkpoint, required=False)
    check_id("event_id", ev.event_id, EVENT_ID_CHARS, required=False)
    check_text("question", ev.question, QUESTION_CHARS)
    check_text("ground_truth", ev.ground_truth if ev.HasField("ground_truth") else None, GROUND_TRUTH_CHARS)
    return Tree(question=ev.question, prompt=ev.prompt,
                ground_truth=ev.ground_truth if ev.HasField("ground_truth") else None,
                question_id=ev.question_id if ev.HasField("question_id") else None,
                nodes=nodes, meta=json.loads(ev.meta_json) if ev.meta_json else {})


def checkpoint_event(checkpoint_id: str, path: str, round: int, *, parent: str | None = None,
                     metrics: Mapping[str, float] | None = None,
                     promoted_at: datetime | None = None) -> events_pb2.CheckpointEvent:
    """The event published on alphamath.checkpoints.v1 when a checkpoint is promoted."""
    ev = events_pb2.CheckpointEvent(schema_version=SCHEMA_VERSION, checkpoint_id=checkpoint_id, path=path,
                                    round=round, metrics=dict(metrics or {}),
                                    promoted_at=_timestamp(promoted_at))
    if parent is not None:
        ev.parent = parent
    return ev
