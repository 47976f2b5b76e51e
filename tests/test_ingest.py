"""Tree ingestion over the real broker into both databases: idempotent, crash-safe, dead letters."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer

from alphamath.events import TreePublisher
from tests.pipeline import FAST_GROUP, broker, db, make_tree, store, topics  # noqa: F401 - fixtures
from trainer_svc.ingest import Ingestor
from trainer_svc.store import Store

ROOT = Path(__file__).resolve().parent.parent


def publish(bootstrap, topic, trees, checkpoint="ckpt-0"):
    with TreePublisher(bootstrap, topic=topic) as pub:
        return [pub.publish(t, checkpoint, {"iterations": 4}) for t in trees]


def ingest(store, broker, topics, group="alphamath-trainer", **kw):
    with Ingestor(store, broker.bootstrap, group_id=f"{group}-{topics.trees}", topic=topics.trees,
                  dlq_topic=topics.dlq, consumer_config=FAST_GROUP) as ing:
        return ing.run(idle_exit_s=kw.pop("idle_exit_s", 0.5), **kw)


def test_ingest_duplicates_and_dead_letters(store, broker, topics):
    trees = [make_tree(f"q{i}") for i in range(4)]
    publish(broker.bootstrap, topics.trees, trees[:2])
    publish(broker.bootstrap, topics.trees, trees[:1])  # duplicate delivery of q0 (a retrying producer)
    raw = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    raw.send(topics.trees, key=b"q-bad", value=b"\xff\x00 definitely not protobuf").get(10)
    raw.send(topics.trees, key=b"q-empty", value=b"").get(10)
    raw.close()
    publish(broker.bootstrap, topics.trees, trees[2:])  # after the poison records: still consumed
    stats = ingest(store, broker, topics)
    assert (stats.records, stats.inserted, stats.duplicates, stats.dead_letters) == (7, 4, 1, 2)
    assert store.counts() == {"trees": 4, "examples": 8, "correct_examples": 4, "dead_letters": 2}
    dlq = KafkaConsumer(topics.dlq, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                        consumer_timeout_ms=5000)
    dead = {}
    for rec in dlq:
        dead[rec.key] = dict(rec.headers)
        if len(dead) == 2:
            break
    dlq.close()
    assert set(dead) == {b"q-bad", b"q-empty"}
    assert dead[b"q-bad"]["reason"].startswith(b"not a TreeEvent")
    assert dead[b"q-empty"]["reason"] == b"empty record value"
    assert dead[b"q-bad"]["source_topic"] == topics.trees.encode()
    # committed offsets: a restarted ingestor in the same group finds nothing new
    assert ingest(store, broker, topics).records == 0
    # a different group re-reads everything and the store still holds each tree once
    again = ingest(store, broker, topics, group="replay")
    assert (again.inserted, again.duplicates) == (0, 5)
    assert store.counts()["trees"] == 4


def run_trainer(broker, topics, db, fault=None, timeout=60):
    url, schema = db
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ALPHAMATH_FAULT_KILL_AT", None)
    if fault:
        env["ALPHAMATH_FAULT_KILL_AT"] = fault
    cmd = [sys.executable, "-m", "trainer_svc.ingest", "--bootstrap", broker.bootstrap, "--db-url", url,
           "--topic", topics.trees, "--dlq-topic", topics.dlq, "--group", f"crash-{topics.trees}",
           "--idle-exit", "0.5", "--session-timeout-ms", str(FAST_GROUP["session_timeout_ms"])]
    if schema:
        cmd += ["--db-schema", schema]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_trainer_killed_at_any_point_loses_and_duplicates_nothing(db, broker, topics):
    """SIGKILL between the DB commit and the offset commit (the dangerous window), before the DB
    commit and right after the offset commit; each restart resumes where the last one stopped."""
    trees = [make_tree(f"q{i}", answers=("4", str(i + 5))) for i in range(9)]
    publish(broker.bootstrap, topics.trees, trees)
    s = Store(*db)
    try:
        proc = run_trainer(broker, topics, db, "after_db_commit:2")
        assert proc.returncode == -9, proc.stderr[-2000:]
        # the dangerous window was hit: two trees are in the DB, no offset is committed yet
        assert s.counts()["trees"] == 2 and committed(broker, topics) == 0
        proc = run_trainer(broker, topics, db, "before_db_commit:2")
        assert proc.returncode == -9, proc.stderr[-2000:]
        assert committed(broker, topics) == 0
        proc = run_trainer(broker, topics, db, "after_offset_commit:1")
        assert proc.returncode == -9, proc.stderr[-2000:]
        # the redelivered trees were recognised; every tree is stored exactly once
        assert committed(broker, topics) == 9
        assert s.counts() == {"trees": 9, "examples": 18, "correct_examples": 9, "dead_letters": 0}
        final = run_trainer(broker, topics, db)
        assert final.returncode == 0, final.stderr[-2000:]
        assert "records=0 " in final.stdout  # nothing left to re-read after the committed offsets
        assert sorted(t.question_id for t in s.trees()) == sorted(t.question_id for t in trees)
    finally:
        s.close()


def committed(broker, topics) -> int:
    """Sum of the offsets the crash-test group has committed on the trees topic."""
    from kafka import TopicPartition
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=f"crash-{topics.trees}")
    try:
        return sum(c.committed(TopicPartition(topics.trees, p)) or 0 for p in (0, 1))
    finally:
        c.close()
