"""The trainer's database on SQLite and PostgreSQL: idempotent trees, checkpoints, jobs."""
from __future__ import annotations

import threading

import pytest

from tests.pipeline import db, make_tree, store  # noqa: F401 - fixtures
from trainer_svc.ingest import store_tree
from trainer_svc.store import Store


def test_tree_stored_once_with_its_examples(store):
    t = make_tree("q1", answers=("4", "5"))
    first = store_tree(store, t, "ckpt-0", "ev-1", {"iterations": 4}, source="trees[0]@0")
    again = store_tree(store, t, "ckpt-0", "ev-2")  # redelivered (even under another event id)
    assert first.inserted and first.examples == 2
    assert not again.inserted and again.tree_id == first.tree_id
    assert store.counts() == {"trees": 1, "examples": 2, "correct_examples": 1, "dead_letters": 0}
    # the same question searched by another checkpoint is a different tree
    assert store_tree(store, t, "ckpt-1").inserted
    assert store.counts("ckpt-1")["trees"] == 1
    assert [e.correct for e in store.examples("ckpt-0")] == [True, False]
    assert store.trees("ckpt-0")[0].to_dict() == t.to_dict()


def test_concurrent_ingestors_store_a_tree_once(db):
    stores = [Store(*db) for _ in range(4)]
    trees = [make_tree(f"q{i}") for i in range(5)]
    results = []

    def work(s):
        for t in trees:
            results.append(store_tree(s, t, "c"))

    threads = [threading.Thread(target=work, args=(s,)) for s in stores]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sum(r.inserted for r in results) == 5
    assert stores[0].counts()["trees"] == 5 and stores[0].counts()["examples"] == 10
    for s in stores:
        s.close()


def test_checkpoints_and_promotion(store):
    store.add_checkpoint("embedded", "/models/base", round=0, promoted=True, metrics={"greedy_acc": 0.1})
    store.add_checkpoint("r1", "/models/r1", round=1, parent="embedded", trees=10, examples=40)
    assert store.current_checkpoint().id == "embedded"
    store.set_metrics("r1", {"greedy_acc": 0.2})
    store.promote("r1")
    cur = store.current_checkpoint()
    assert (cur.id, cur.parent, cur.trees, cur.examples, cur.metrics) == ("r1", "embedded", 10, 40, {"greedy_acc": 0.2})
    assert [c.id for c in store.checkpoints()] == ["embedded", "r1"]
    with pytest.raises(KeyError):
        store.promote("nope")


def test_jobs_and_dead_letters(store):
    job = store.create_job("embedded", round=1, config={"epochs": 1})
    assert store.job(job.id).state == "pending"
    store.update_job(job.id, state="running", total_steps=4)
    store.update_job(job.id, step=4, loss=1.5, state="succeeded", output_checkpoint="r1")
    j = store.job(job.id)
    assert (j.state, j.step, j.loss, j.output_checkpoint) == ("succeeded", 4, 1.5, "r1")
    assert j.started_at is not None and j.finished_at is not None
    assert store.latest_job().id == job.id
    with pytest.raises(AttributeError):
        store.update_job(job.id, bogus=1)
    assert store.record_dead_letter("t", 0, 7, "k", "not a TreeEvent")
    assert not store.record_dead_letter("t", 0, 7, "k", "again")  # same source record: once
    assert store.counts()["dead_letters"] == 1


def test_postgres_schema_name_is_checked():
    with pytest.raises(ValueError, match="schema"):
        Store("postgresql+psycopg://postgres@127.0.0.1:5432/test", 'x"; drop table y; --', create=False)


def test_lineage_trees_follow_parents_back_as_many_checkpoints_as_asked(store):
    from trainer_svc.registry import lineage_trees
    store.add_checkpoint("embedded", "/m", 0, promoted=True)
    store.add_checkpoint("round-1-a", "/c1", 1, parent="embedded", promoted=True)
    store.add_checkpoint("round-1-b", "/c1b", 1, parent="embedded")  # a sibling never promoted
    store.add_checkpoint("round-2-a", "/c2", 2, parent="round-1-a")
    for q, ckpt in (("q0", "embedded"), ("q1", "round-1-a"), ("q1b", "round-1-b"), ("q2", "round-2-a")):
        store_tree(store, make_tree(q), ckpt)
    ids = lambda c, n: [t.question_id for t in lineage_trees(store, c, n)]  # noqa: E731
    assert ids("round-2-a", 1) == ["q2"]
    assert ids("round-2-a", 2) == ["q2", "q1"]
    assert ids("round-2-a", 3) == ids("round-2-a", 9) == ["q2", "q1", "q0"]  # the sibling's are not its lineage
    assert ids("embedded", 3) == ["q0"] and ids("unknown", 3) == []
