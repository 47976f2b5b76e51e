"""Fixtures and builders shared by the event-pipeline tests (broker, both databases, trees).

One real tansu broker per test session; every test gets its own topic names so tests never see
each other's records. The database fixture runs each test on SQLite and on PostgreSQL
(127.0.0.1:5432/test, its own schema, dropped afterwards).
"""
from __future__ import annotations

import os
import uuid

import pytest

from alphamath.broker import create_topics, start_broker
from alphamath.steps import Step
from alphamath.tree import Tree
from search_svc.mcts import backup

PG_URL = os.environ.get("ALPHAMATH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# Fast group membership in tests: joins take ~session/2 and a killed member is evicted after it.
FAST_GROUP = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 300}


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    b = start_broker(log_path=log)
    yield b
    b.stop()


class Topics:
    def __init__(self, bootstrap: str):
        tag = uuid.uuid4().hex[:8]
        self.trees = f"test.{tag}.trees.v1"
        self.checkpoints = f"test.{tag}.checkpoints.v1"
        self.dlq = f"test.{tag}.trees.dlq.v1"
        create_topics(bootstrap, {self.trees: 2, self.checkpoints: 1, self.dlq: 1})


@pytest.fixture
def topics(broker):
    return Topics(broker.bootstrap)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path):
    """(url, schema) of an empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'trainer.db'}", None
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield PG_URL, schema
    from trainer_svc.store import Store
    Store(PG_URL, schema, create=False).drop_schema()


@pytest.fixture
def store(db):
    from trainer_svc.store import Store
    s = Store(*db)
    yield s
    s.close()


def answer_step(ans: str) -> Step:
    return Step(f"So the answer is \\boxed{{{ans}}}.", "answer", answer=ans)


def make_tree(qid: str = "q1", truth: str = "4", answers=("4", "5"), code_error_path: bool = False) -> Tree:
    """A small finished MCTS-like tree: root -> a code step -> one answer leaf per `answers`,
    plus (optionally) a path whose only code step failed. Visits/values backed up as MCTS would."""
    t = Tree(question=f"What is 2+2? ({qid})", prompt="<|user|>What is 2+2?<step>", ground_truth=truth,
             question_id=qid)
    code = t.add_child(0, Step("Add them.", "code", code="print(2+2)", output="4"), prior=0.6, token_count=7)
    for a in answers:
        leaf = t.add_child(code.id, answer_step(a), prior=0.4, token_count=5)
        leaf.terminal_reason, leaf.correct = "answer", a == truth
        backup(t, leaf.id, 1.0 if leaf.correct else -1.0)
    if code_error_path:
        bad = t.add_child(0, Step("Try.", "code", code="1/0", output="ZeroDivisionError", code_error=True), 0.3)
        leaf = t.add_child(bad.id, answer_step("5"), prior=0.2)
        leaf.terminal_reason, leaf.correct = "answer", False
        backup(t, leaf.id, -1.0)
    t.meta.update(method="mcts", config={"iterations": 4})
    return t


