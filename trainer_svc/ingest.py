"""Tree ingestion: alphamath.trees.v1 -> database, exactly once in effect.

The consumer group `alphamath-trainer` reads TreeEvents with auto-commit off. For each batch:
  1. every record is decoded, its training examples are extracted (trainer_svc.examples), and
     both are stored in one DB transaction (idempotent, see `store_tree` and Store);
     a record that cannot be decoded goes to alphamath.trees.dlq.v1 (acks=all, with the reason
     in a header) and is recorded in the DB;
  2. only then are the batch's offsets committed.
A trainer killed anywhere in between re-reads at most the uncommitted records on restart, and the
store recognises those it already has: nothing is lost, nothing is stored twice.

Failures are sorted by what retrying can do (see `classify`):
  - permanent (a record that is not a valid tree, a value the store refuses, a violated
    constraint): dead-lettered with the reason, its offset committed, the next record goes on;
  - transient (database or broker unreachable, a rebalance that voided the commit): the batch's
    remaining records are read again after a backoff (0.5 s doubling to 10 s), for at most
    `retry_budget_s` in a row;
  - anything else, or transient errors beyond the budget: `run` raises IngestFailed. The trainer
    service then reports NOT_SERVING and exits non-zero so that Kubernetes restarts it.

Crash points for the kill tests (trainer_svc.faults): before_db_commit, after_db_commit,
after_offset_commit.

    python -m trainer_svc.ingest [--bootstrap HOST:PORT] [--idle-exit SECONDS] [--max-trees N]
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass

from alphamath.broker import DLQ_TOPIC, TREES_TOPIC, bootstrap_from_env
from alphamath.convert import tree_from_event
from alphamath.events import CONSUMER_DEFAULTS, note_assignments, reliable_producer
from alphamath.pb import events_pb2
from alphamath.tree import Tree
from trainer_svc.examples import extract_examples, tree_hash
from trainer_svc.faults import fault_point
from trainer_svc.store import IngestResult, Store

log = logging.getLogger(__name__)
GROUP_ID = "alphamath-trainer"
class Undecodable(ValueError):
    """A record that can never become a tree: it goes to the dead-letter topic."""


class IngestFailed(RuntimeError):
    """Ingestion cannot go on in this process (an unexpected error, or a transient one that outlasted
    the retry budget); the owner must fail loudly."""


class _Retry(Exception):
    """Internal: a transient error; the batch's unhandled records were sought back for a retry."""


PERMANENT, TRANSIENT = "permanent", "transient"


def classify(exc: BaseException) -> str | None:
    """PERMANENT (dead-letter the record), TRANSIENT (retry later) or None (unexpected: fail)."""
    from kafka.errors import KafkaError
    from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError

    if isinstance(exc, (DataError, IntegrityError)):
        return PERMANENT
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return TRANSIENT
    if isinstance(exc, (OperationalError, InterfaceError, KafkaError, ConnectionError, TimeoutError)):
        return TRANSIENT
    if isinstance(exc, (ValueError, TypeError)):  # Undecodable, InvalidRecord, a malformed tree
        return PERMANENT
    return None


def decode(value: bytes | None):
    """TreeEvent bytes -> (Tree, event); Undecodable with the reason otherwise."""
    if not value:
        raise Undecodable("empty record value")
    try:
        ev = events_pb2.TreeEvent.FromString(value)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise Undecodable(f"not a TreeEvent: {type(e).__name__}: {e}") from e
    try:
        tree = tree_from_event(ev)
    except (ValueError, TypeError) as e:
        raise Undecodable(f"invalid TreeEvent: {e}") from e
    if not tree.question_id:
        raise Undecodable("TreeEvent has no question_id")
    return tree, ev


def store_tree(store: Store, tree: Tree, checkpoint: str, event_id: str = "", search_config: dict | None = None,
               source: str | None = None) -> IngestResult:
    """Store `tree`, built by `checkpoint`, with the training examples extracted from it; a tree
    already stored (same question, checkpoint and content hash) is a no-op."""
    return store.add_tree(tree, checkpoint, event_id, search_config, source,
                          tree_hash=tree_hash(tree), examples=extract_examples(tree))


@dataclass
class IngestStats:
    records: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    examples: int = 0
    retries: int = 0  # transient failures retried

    def add(self, other: "IngestStats") -> None:
        self.records += other.records
        self.inserted += other.inserted
        self.duplicates += other.duplicates
        self.dead_letters += other.dead_letters
        self.examples += other.examples
        self.retries += other.retries


class Ingestor:
    def __init__(self, store: Store, bootstrap: str | None = None, group_id: str = GROUP_ID,
                 topic: str = TREES_TOPIC, dlq_topic: str = DLQ_TOPIC, consumer_config: dict | None = None,
                 max_poll_records: int = 50, retry_budget_s: float = 300.0, max_backoff_s: float = 10.0):
        from kafka import KafkaConsumer

        self.store, self.topic, self.dlq_topic = store, topic, dlq_topic
        self.retry_budget_s, self.max_backoff_s = retry_budget_s, max_backoff_s
        self.last_error: str | None = None
        self.bootstrap = bootstrap or bootstrap_from_env()
        cfg = {**CONSUMER_DEFAULTS, **(consumer_config or {})}
        self.consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=group_id,
                                      enable_auto_commit=False, auto_offset_reset="earliest",
                                      max_poll_records=max_poll_records, client_id="alphamath-trainer", **cfg)
        # kafka-python keeps a partition's in-memory position across a rebalance. After a restart
        # of a memory-storage broker the log starts again at 0 while that position is wherever
        # the old log was: records below it would be skipped. So every assignment restarts
        # from the group's committed offset (none after such a restart: the beginning): the
        # listener only notes the assigned partitions, poll_once seeks.
        self._reposition: set = set()
        self.consumer.subscribe([topic], listener=note_assignments(self._reposition))
        self._dlq = None
        self.total = IngestStats()
        self._stop = threading.Event()

    def _dead_letter(self, rec, reason: str) -> None:
        if self._dlq is None:
            self._dlq = reliable_producer(self.bootstrap)
        headers = [("reason", reason.encode()), ("source_topic", rec.topic.encode()),
                   ("source_partition", str(rec.partition).encode()), ("source_offset", str(rec.offset).encode())]
        self._dlq.send(self.dlq_topic, key=rec.key, value=rec.value or b"", headers=headers).get(timeout=30)
        key = rec.key.decode(errors="replace") if rec.key else None
        self.store.record_dead_letter(rec.topic, rec.partition, rec.offset, key, reason)
        log.warning("dead-lettered %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, reason)

    def _handle(self, rec, stats: IngestStats) -> None:
        """Store one record or dead-letter it; a transient or unexpected error propagates."""
        try:
            self._store(rec, stats)
        except Exception as e:  # noqa: BLE001 - sorted below
            if classify(e) != PERMANENT:
                raise
            reason = str(e) if isinstance(e, Undecodable) else f"{type(e).__name__}: {e}"
            self._dead_letter(rec, reason)
            stats.dead_letters += 1
        stats.records += 1

    def _store(self, rec, stats: IngestStats) -> None:
        tree, ev = decode(rec.value)
        try:
            search_config = json.loads(ev.search_config_json) if ev.search_config_json else {}
        except ValueError:
            search_config = {"unparsed": ev.search_config_json}
        fault_point("before_db_commit")
        res = store_tree(self.store, tree, ev.checkpoint, ev.event_id, search_config,
                         source=f"{rec.topic}[{rec.partition}]@{rec.offset}")
        fault_point("after_db_commit")
        if res.inserted:
            stats.inserted += 1
            stats.examples += res.examples
        else:
            stats.duplicates += 1

    def poll_once(self, timeout_ms: int = 1000) -> IngestStats:
        """One batch: store every record, then commit the batch's offsets."""
        from kafka import OffsetAndMetadata

        stats = IngestStats()
        batches = self.consumer.poll(timeout_ms=timeout_ms)
        if self._reposition:
            moved: set = set()
            try:
                self._seek_committed(moved)
            except Exception:  # noqa: BLE001 - keep this batch's records for the retry, then sort it out
                for tp, records in batches.items():
                    if tp not in moved and tp not in self._reposition:
                        self.consumer.seek(tp, records[0].offset)
                raise
            # records fetched before the seek are read again from the new position
            batches = {tp: r for tp, r in batches.items() if tp not in moved}
        if not batches:
            return stats
        offsets = {}
        try:
            for tp, records in batches.items():
                for rec in records:
                    self._handle(rec, stats)
                    offsets[tp] = OffsetAndMetadata(rec.offset + 1, "", -1)
        except Exception as e:  # noqa: BLE001 - transient: retry the rest; otherwise fatal
            self.total.add(stats)
            if classify(e) != TRANSIENT:
                raise
            # Keep what is stored, and read the unhandled records again after the backoff.
            for tp, records in batches.items():
                self.consumer.seek(tp, offsets[tp].offset if tp in offsets else records[0].offset)
            if offsets:
                try:
                    self.consumer.commit(offsets)
                except Exception as ce:  # noqa: BLE001 - the store recognises the re-read trees
                    log.warning("committing the partial batch failed (%s); those trees will be read again", ce)
            raise _Retry(f"{type(e).__name__}: {e}") from e
        self.consumer.commit(offsets)
        self.total.add(stats)
        log.info("ingested %d records: %d new trees (%d examples), %d duplicates, %d dead letters",
                 stats.records, stats.inserted, stats.examples, stats.duplicates, stats.dead_letters)
        fault_point("after_offset_commit")
        return stats

    def _seek_committed(self, moved: set) -> None:
        """Position newly assigned partitions at the group's committed offset (or the beginning);
        each is added to `moved` once done (a failure leaves the rest pending for the next poll)."""
        assigned = self.consumer.assignment()
        for tp in list(self._reposition):
            if tp in assigned:
                committed = self.consumer.committed(tp)
                if committed is None:
                    self.consumer.seek_to_beginning(tp)
                else:
                    self.consumer.seek(tp, committed)
            self._reposition.discard(tp)
            moved.add(tp)

    def run(self, idle_exit_s: float | None = None, max_trees: int | None = None,
            poll_ms: int = 1000) -> IngestStats:
        """Consume until stop(), until `idle_exit_s` pass with nothing new after the first record
        (or after joining), or until `max_trees` records have been handled."""
        last, assigned = time.monotonic(), False
        failing_since, backoff = None, 0.5
        while not self._stop.is_set():
            try:
                s = self.poll_once(poll_ms)
            except Exception as e:  # noqa: BLE001 - transient errors are retried, the rest is fatal
                if not isinstance(e, _Retry) and classify(e) != TRANSIENT:
                    self.last_error = f"{type(e).__name__}: {e}"
                    raise IngestFailed(f"ingestion stopped by an unexpected error: {self.last_error}") from e
                now = time.monotonic()
                failing_since = failing_since or now
                self.last_error = str(e) if isinstance(e, _Retry) else f"{type(e).__name__}: {e}"
                self.total.retries += 1
                if now - failing_since > self.retry_budget_s:
                    raise IngestFailed(f"ingestion kept failing for {now - failing_since:.0f} s "
                                       f"(budget {self.retry_budget_s:.0f} s): {self.last_error}") from e
                log.warning("ingestion: transient error (%s); retrying in %.1f s", self.last_error, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            failing_since, backoff = None, 0.5
            if s.records or (not assigned and self.consumer.assignment()):
                assigned = assigned or bool(self.consumer.assignment())
                last = time.monotonic()  # idle time counts from the join, not from start-up
            if max_trees is not None and self.total.records >= max_trees:
                break
            if idle_exit_s is not None and self.consumer.assignment() and time.monotonic() - last > idle_exit_s:
                break
        return self.total

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.consumer.close(autocommit=False)
        if self._dlq is not None:
            self._dlq.close(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer_svc.ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap", default=None)
    p.add_argument("--db-url", default=None)
    p.add_argument("--db-schema", default=None)
    p.add_argument("--group", default=GROUP_ID)
    p.add_argument("--topic", default=TREES_TOPIC)
    p.add_argument("--dlq-topic", default=DLQ_TOPIC)
    p.add_argument("--session-timeout-ms", type=int, default=CONSUMER_DEFAULTS["session_timeout_ms"])
    p.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")
    p.add_argument("--max-trees", type=int, default=None)
    p.add_argument("--retry-budget", type=float, default=300.0,
                   help="seconds of consecutive transient errors (database/broker down) before giving up")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = Store(a.db_url, a.db_schema)
    ing = Ingestor(store, a.bootstrap, a.group, topic=a.topic, dlq_topic=a.dlq_topic,
                   consumer_config={"session_timeout_ms": a.session_timeout_ms,
                                    "heartbeat_interval_ms": max(100, a.session_timeout_ms // 6)},
                   retry_budget_s=a.retry_budget)
    signal.signal(signal.SIGTERM, lambda *_: ing.stop())
    try:
        total = ing.run(idle_exit_s=a.idle_exit, max_trees=a.max_trees)
    except IngestFailed as e:
        log.critical("%s", e)
        return 1
    finally:
        ing.close()
        store.close()
    print(f"records={total.records} inserted={total.inserted} duplicates={total.duplicates} "
          f"dead_letters={total.dead_letters} examples={total.examples} retries={total.retries}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
