"""Training examples from one finished MCTS tree, as AlphaMath extracts them.

Each example is a root-to-leaf path ending in a terminal step: it is *correct* when the leaf's
answer matches the ground truth and *wrong* otherwise (wrong answer, malformed step, too deep,
too many code errors). Every step carries its mean outcome as the value-head target: the average
reward (+1 / -1) of the finished paths below it (alphamath.tree.Tree.outcome_values explains why
not MCTS's Q, a deliberate difference from the paper's code). The LM loss uses only correct paths;
the value loss uses all of them.

Per question at most 4 correct and 4 wrong paths are kept (a seeded sample, reproducible per
question), identical paths are kept once, and paths whose every code step failed are dropped:
they teach nothing but error messages.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass

from alphamath.steps import STEP_OPEN, render_step
from alphamath.tree import Node, Tree

MAX_CORRECT = 4
MAX_WRONG = 4


@dataclass(frozen=True)
class Example:
    """One path: the prompt, its rendered steps (text after each "<step>") and each step's Q."""

    question_id: str
    prompt: str
    steps: tuple[str, ...]
    values: tuple[float, ...]
    correct: bool

    def __post_init__(self):
        if not self.steps:
            raise ValueError("an example needs at least one step")
        if len(self.steps) != len(self.values):
            raise ValueError(f"{len(self.steps)} steps but {len(self.values)} value targets")

    @property
    def text(self) -> str:
        """Prompt plus steps, exactly as the policy saw/wrote them (see alphamath.steps.render_state)."""
        return self.prompt + STEP_OPEN.join(self.steps)

    def step_end_chars(self) -> list[int]:
        """Character offset just past each step in `text`: where the value head is read."""
        ends, pos = [], len(self.prompt)
        for i, s in enumerate(self.steps):
            pos += (len(STEP_OPEN) if i else 0) + len(s)
            ends.append(pos)
        return ends

    @property
    def key(self) -> str:
        """Content hash: the same path (same prompt and steps) from any tree has the same key."""
        h = hashlib.sha256(self.prompt.encode())
        for s in self.steps:
            h.update(b"\x00" + s.encode())
        return h.hexdigest()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["steps"], d["values"] = list(self.steps), list(self.values)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Example":
        return cls(question_id=d["question_id"], prompt=d["prompt"], steps=tuple(d["steps"]),
                   values=tuple(float(v) for v in d["values"]), correct=bool(d["correct"]))


def path_label(tree: Tree, leaf: Node) -> bool | None:
    """True/False for a finished path, None for a leaf that search never finished."""
    if not leaf.terminal:
        return None
    if leaf.terminal_reason == "answer":
        if leaf.correct is None:
            return None  # no ground truth: nothing to learn from this path
        return bool(leaf.correct)
    return False  # malformed, max_depth, code_errors, ...


def all_code_failed(path: list[Node]) -> bool:
    code = [n for n in path if n.code is not None]
    return bool(code) and all(n.code_error for n in path if n.code is not None)


def extract_examples(tree: Tree, max_correct: int = MAX_CORRECT, max_wrong: int = MAX_WRONG,
                     seed: int = 0) -> list[Example]:
    """Correct paths first, then wrong ones; each group a reproducible sample of at most max_* paths."""
    if tree.ground_truth is None:
        return []
    qid = tree.question_id or hashlib.sha256(tree.question.encode()).hexdigest()[:16]
    by_label: dict[bool, dict[str, Example]] = {True: {}, False: {}}
    outcomes = tree.outcome_values()  # value targets: every step on a finished path has one
    for leaf in tree.leaves():
        label = path_label(tree, leaf)
        if label is None:
            continue
        path = tree.path(leaf.id)
        if all_code_failed(path):
            continue
        ex = Example(question_id=qid, prompt=tree.prompt,
                     steps=tuple(render_step(n.step()) for n in path),
                     values=tuple(outcomes[n.id] for n in path), correct=label)
        by_label[label].setdefault(ex.key, ex)  # the first of identical paths wins
    rng = random.Random(f"{seed}:{qid}")
    out = []
    for label, cap in ((True, max_correct), (False, max_wrong)):
        pool = list(by_label[label].values())
        out += pool if len(pool) <= cap else rng.sample(pool, cap)
    return out


def cap_per_question(examples: list[Example], max_correct: int = MAX_CORRECT, max_wrong: int = MAX_WRONG,
                     seed: int = 0) -> list[Example]:
    """At most max_correct correct and max_wrong wrong paths per question over all its trees (a
    question searched twice by one checkpoint must not count twice), a reproducible sample."""
    groups: dict[tuple[str, bool], list[Example]] = {}
    for e in examples:
        groups.setdefault((e.question_id, e.correct), []).append(e)
    out = []
    for (qid, label), pool in groups.items():
        cap = max_correct if label else max_wrong
        out += pool if len(pool) <= cap else random.Random(f"{seed}:{qid}:{label}").sample(pool, cap)
    return out


def held_out(question_id: str, share: float) -> bool:
    """Is this question's tree kept out of training, for judging value heads on trees they never
    saw (the promotion gate)? A hash of the id, so every process agrees without coordination."""
    return share > 0 and int(hashlib.sha256(question_id.encode()).hexdigest()[:8], 16) / 2 ** 32 < share


def tree_hash(tree: Tree) -> str:
    """Content hash of a tree (meta excluded: it carries timings that differ between re-runs)."""
    d = tree.to_dict()
    d.pop("meta", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
