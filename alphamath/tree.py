"""The search tree as explicit arrays of nodes, with JSON (de)serialisation.

Node statistics follow the paper: N visits, W value sum, Q = W / N (0 when unvisited).
Node 0 is the root (the question); every other node is one step.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from alphamath.steps import Step, generation_prefix, render_state

SCHEMA_VERSION = 1

# Why a node is terminal. "answer" nodes carry an answer; the others back up -1 with ground truth.
TERMINAL_REASONS = ("answer", "malformed", "max_depth", "code_errors", "children_terminal", "no_children")


@dataclass
class Node:
    id: int
    parent: int | None
    depth: int
    text: str = ""
    kind: str = "root"  # root | text | code | answer | malformed
    code: str | None = None
    output: str | None = None
    code_error: bool = False
    prior: float = 1.0
    value: float | None = None  # value-head estimate (or terminal reward) of this node's state
    N: int = 0
    W: float = 0.0
    terminal_reason: str | None = None
    answer: str | None = None
    correct: bool | None = None
    token_count: int = 0
    children: list[int] = field(default_factory=list)
    # Of the samples drawn in the expansion that made this node, the share that were this very step
    # (identical samples are one child). SBS's vote weighs an answer by the product along its path.
    share: float = 1.0

    @property
    def Q(self) -> float:
        return self.W / self.N if self.N else 0.0

    @property
    def terminal(self) -> bool:
        return self.terminal_reason is not None

    @property
    def expanded(self) -> bool:
        return bool(self.children)

    def step(self) -> Step:
        return Step(self.text, self.kind, code=self.code, output=self.output,
                    code_error=self.code_error, answer=self.answer)


@dataclass
class Tree:
    question: str
    prompt: str
    ground_truth: str | None = None
    question_id: str | None = None
    nodes: list[Node] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # method, config, checkpoint, timings

    def __post_init__(self):
        if not self.nodes:
            self.nodes.append(Node(id=0, parent=None, depth=0))

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def add_child(self, parent: int, step: Step, prior: float, token_count: int = 0,
                  share: float = 1.0) -> Node:
        node = Node(id=len(self.nodes), parent=parent, depth=self.nodes[parent].depth + 1,
                    text=step.text, kind=step.kind, code=step.code, output=step.output,
                    code_error=step.code_error, prior=prior, answer=step.answer,
                    token_count=token_count, share=share)
        self.nodes.append(node)
        self.nodes[parent].children.append(node.id)
        return node

    def path(self, node_id: int) -> list[Node]:
        """Nodes from the root's first step down to node_id (the root itself excluded)."""
        out = []
        while node_id is not None and node_id != 0:
            if len(out) >= len(self.nodes):  # a parent cycle would otherwise loop forever
                raise ValueError(f"node {out[0].id}'s parent chain has a cycle")
            out.append(self.nodes[node_id])
            node_id = self.nodes[node_id].parent
        return out[::-1]

    def steps(self, node_id: int) -> list[Step]:
        return [n.step() for n in self.path(node_id)]

    def state(self, node_id: int) -> str:
        """Text the value head scores for this node."""
        return render_state(self.prompt, self.steps(node_id))

    def prefix(self, node_id: int) -> str:
        """Text the policy continues to write this node's children."""
        return generation_prefix(self.prompt, self.steps(node_id))

    def code_cells(self, node_id: int) -> list[str]:
        return [n.code for n in self.path(node_id) if n.code]

    def outcome_values(self) -> dict[int, float]:
        """Each node's mean outcome: the average reward (+1 a correct answer, -1 any other ending)
        over the finished leaves below it (itself included), for every node that has one. This,
        not MCTS's Q, is the value head's target: Q also averages in the head's own estimates of
        unfinished states, and round 1's zero head pulls every open step towards 0. Measured on
        24 base-model trees: open steps' mean Q -0.49 against a mean reward of -0.94 below them,
        while answers average -0.87, so a head that learns Q ranks every open step above every
        answer, and SBS walks past the answers it finds."""
        total, count = [0.0] * len(self.nodes), [0] * len(self.nodes)
        for n in reversed(self.nodes):  # ids grow down the tree: children are summed before parents
            if n.id and n.terminal and not n.children and (n.terminal_reason != "answer" or n.correct is not None):
                total[n.id] += 1.0 if n.terminal_reason == "answer" and n.correct else -1.0
                count[n.id] += 1
            if n.parent is not None:
                total[n.parent] += total[n.id]
                count[n.parent] += count[n.id]
        return {i: total[i] / c for i, c in enumerate(count) if c}

    def leaves(self) -> list[Node]:
        return [n for n in self.nodes if not n.children and n.id != 0]

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("question", "prompt", "ground_truth", "question_id", "meta")}
        d["schema_version"] = SCHEMA_VERSION
        d["nodes"] = [{**asdict(n), "Q": n.Q} for n in self.nodes]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Tree":
        if d.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise ValueError(f"unsupported tree schema_version {d.get('schema_version')}")
        names = {f.name for f in fields(Node)}
        nodes = [Node(**{k: v for k, v in n.items() if k in names}) for n in d["nodes"]]
        return cls(question=d["question"], prompt=d["prompt"], ground_truth=d.get("ground_truth"),
                   question_id=d.get("question_id"), nodes=nodes, meta=d.get("meta") or {})

    @classmethod
    def from_json(cls, s: str) -> "Tree":
        return cls.from_dict(json.loads(s))
