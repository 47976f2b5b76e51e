"""Kafka producers and consumers of alphamath's events (protobuf payloads, kafka-python clients).

- TreePublisher: search_svc publishes every finished GenerateTrees tree on `alphamath.trees.v1`,
  keyed by question id, with acks=all and retries; `publish` returns only once the broker has
  acknowledged the record, so a tree is never reported done before it is durable.
- CheckpointPublisher: the promotion gate announces a promoted checkpoint on
  `alphamath.checkpoints.v1`.
- CheckpointListener: a background consumer in policy_svc / value_svc that hands each promoted
  checkpoint to a callback (which reloads the model, see follow_checkpoints). On start it
  replays the latest promotion, so a service that (re)starts after a promotion still switches.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Mapping

from alphamath.broker import CHECKPOINTS_TOPIC, TREES_TOPIC, bootstrap_from_env
from alphamath.convert import checkpoint_event, tree_to_event
from alphamath.pb import events_pb2
from alphamath.tree import Tree

log = logging.getLogger(__name__)

# Short group timeouts: kafka-python waits about session_timeout/2 for a join, and a crashed
# member's partitions move to a survivor after session_timeout.
CONSUMER_DEFAULTS = dict(session_timeout_ms=6000, heartbeat_interval_ms=1000, max_poll_interval_ms=300_000,
                         request_timeout_ms=30_500)


def reliable_producer(bootstrap: str | None = None, **overrides):
    """A producer that only counts a record as sent once every in-sync replica has it.

    Idempotence (kafka-python's default) is off: its producer id does not survive a restart of
    the local broker (memory storage), after which every send failed with UnknownProducerIdError.
    A retried send may then write a record twice; consumers dedupe (the trainer's store
    recognises a tree it already holds), so nothing is stored twice."""
    from kafka import KafkaProducer

    cfg = dict(bootstrap_servers=bootstrap or bootstrap_from_env(), acks="all", retries=10,
               enable_idempotence=False,
               retry_backoff_ms=200, max_in_flight_requests_per_connection=1,  # keep per-key order on retry
               linger_ms=0, request_timeout_ms=15_000, client_id="alphamath")
    cfg.update(overrides)
    return KafkaProducer(**cfg)


class _Publisher:
    def __init__(self, bootstrap: str | None, topic: str, timeout_s: float, producer=None):
        self.topic, self.timeout_s = topic, timeout_s
        self._producer = producer or reliable_producer(bootstrap)
        self._own = producer is None

    def _send(self, key: str, value: bytes, headers: list[tuple[str, bytes]] | None = None):
        """Send and wait for the broker's acknowledgement (raises KafkaError when it never comes)."""
        future = self._producer.send(self.topic, key=key.encode(), value=value, headers=headers or [])
        return future.get(timeout=self.timeout_s)

    def close(self) -> None:
        if self._own:
            self._producer.close(timeout=self.timeout_s)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TreePublisher(_Publisher):
    """Finished trees -> alphamath.trees.v1 (TreeEvent, key = question id)."""

    def __init__(self, bootstrap: str | None = None, topic: str = TREES_TOPIC, timeout_s: float = 30.0,
                 producer=None):
        super().__init__(bootstrap, topic, timeout_s, producer)

    def publish(self, tree: Tree, checkpoint: str, search_config: Mapping | None = None,
                event_id: str | None = None) -> events_pb2.TreeEvent:
        """Publish one finished tree and block until acknowledged; returns the event sent."""
        if not tree.question_id:
            raise ValueError("a published tree needs a question_id (it is the record key)")
        ev = tree_to_event(tree, checkpoint=checkpoint, search_config=search_config, event_id=event_id)
        md = self._send(tree.question_id, ev.SerializeToString(),
                        [("schema_version", str(ev.schema_version).encode())])
        log.debug("tree %s published to %s[%d]@%d", tree.question_id, md.topic, md.partition, md.offset)
        return ev


class CheckpointPublisher(_Publisher):
    """Promoted checkpoints -> alphamath.checkpoints.v1 (CheckpointEvent, key = checkpoint id)."""

    def __init__(self, bootstrap: str | None = None, topic: str = CHECKPOINTS_TOPIC, timeout_s: float = 30.0,
                 producer=None):
        super().__init__(bootstrap, topic, timeout_s, producer)

    def publish(self, checkpoint_id: str, path: str, round: int, parent: str | None = None,
                metrics: Mapping[str, float] | None = None) -> events_pb2.CheckpointEvent:
        ev = checkpoint_event(checkpoint_id, str(path), round, parent=parent, metrics=metrics)
        self._send(checkpoint_id, ev.SerializeToString())
        return ev


def note_assignments(pending: set):
    """A consumer rebalance listener that only keeps `pending` up to date: the partitions assigned
    and not yet positioned (assigned ones added, revoked ones dropped). It runs on kafka-python's
    IO thread, where blocking consumer calls are not allowed: the poll loop positions them."""
    from kafka import ConsumerRebalanceListener

    class _OnAssign(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked):
            pending.difference_update(revoked)

        def on_partitions_assigned(self, assigned):
            pending.update(assigned)

    return _OnAssign()


class CheckpointListener:
    """Calls `on_checkpoint(CheckpointEvent)` for every promotion, from a daemon thread.

    Every service replica must use its own `group_id` (e.g. "policy-<pod name>"): in one group the
    single checkpoint partition would go to one member only. With `replay_latest` the listener
    starts at the last promotion already on the topic, so a (re)started service catches up with the
    checkpoint in force; the callback should ignore a checkpoint it already serves. Exceptions in
    the callback are logged and the event is skipped (a bad checkpoint must not kill the service).

    Failures: an undecodable or incomplete event is logged with its offset, counted in `skipped`
    and committed past (there is no dead-letter topic for checkpoints). Broker errors (KafkaError,
    OSError) are retried with backoff (0.5 s doubling to 10 s) for as long as it takes: the
    service keeps serving its current model meanwhile. Any other error is retried the same way
    `max_failures` times in a row; then, or if the thread ends by any error, `failed` is set and
    `on_fatal(reason)` is called (follow_checkpoints: NOT_SERVING and a non-zero exit).
    """

    def __init__(self, bootstrap: str | None, group_id: str,
                 on_checkpoint: Callable[[events_pb2.CheckpointEvent], None],
                 topic: str = CHECKPOINTS_TOPIC, replay_latest: bool = True, poll_ms: int = 500,
                 consumer_config: Mapping | None = None, on_fatal: Callable[[str], None] | None = None,
                 max_failures: int = 5, max_backoff_s: float = 10.0):
        self.bootstrap = bootstrap or bootstrap_from_env()
        self.group_id, self.topic, self.on_checkpoint = group_id, topic, on_checkpoint
        self.replay_latest, self.poll_ms = replay_latest, poll_ms
        self.consumer_config = {**CONSUMER_DEFAULTS, **(consumer_config or {})}
        self.received = 0
        self.skipped = 0
        self.retries = 0
        self.last_error: str | None = None
        self.on_fatal, self.max_failures, self.max_backoff_s = on_fatal, max_failures, max_backoff_s
        self.failed = threading.Event()
        self.failure: str | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending_seek: set = set()

    def start(self, wait_s: float | None = 30.0) -> "CheckpointListener":
        """Start consuming; with wait_s, block until partitions are assigned (events after this are seen)."""
        self._thread = threading.Thread(target=self._run, name=f"checkpoint-listener-{self.group_id}",
                                        daemon=True)
        self._thread.start()
        if wait_s is not None and not self._ready.wait(wait_s):
            raise TimeoutError(f"checkpoint listener did not join group {self.group_id} within {wait_s}s"
                               + (f": {self.last_error}" if self.last_error else ""))
        return self

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _consumer(self):
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=self.group_id,
                                 enable_auto_commit=False, auto_offset_reset="latest",
                                 client_id=f"alphamath-{self.group_id}", **self.consumer_config)
        consumer.subscribe([self.topic], listener=note_assignments(self._pending_seek))
        return consumer

    def _position(self, consumer) -> set:
        """Seek newly assigned partitions to the latest promotion (or the oldest unseen one)."""
        assigned = set(self._pending_seek)
        self._pending_seek.clear()
        if self.replay_latest and assigned:
            ends = consumer.end_offsets(list(assigned))
            for tp in assigned:
                start = max(ends[tp] - 1, 0)
                committed = consumer.committed(tp)
                if committed is not None:
                    start = min(start, committed)  # never skip a promotion this group has not seen
                consumer.seek(tp, start)
        self._ready.set()
        return assigned

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - the thread must not end silently
            self.failure = f"checkpoint listener {self.group_id} stopped: {type(e).__name__}: {e}"
            log.critical("%s", self.failure, exc_info=True)
            self.failed.set()
            if self.on_fatal is not None:
                self.on_fatal(self.failure)

    def _loop(self) -> None:
        from kafka.errors import KafkaError

        backoff, unexpected = 0.5, 0
        while not self._stop.is_set():
            consumer = None
            try:
                consumer = self._consumer()
                while not self._stop.is_set():
                    batches = consumer.poll(timeout_ms=self.poll_ms)
                    if self._pending_seek:
                        repositioned = self._position(consumer)
                        # records fetched before the seek are read again from the new position
                        batches = {tp: r for tp, r in batches.items() if tp not in repositioned}
                    for records in batches.values():
                        for rec in records:
                            self._handle(rec)
                    if batches:
                        consumer.commit()
                    backoff, unexpected = 0.5, 0
            except (KafkaError, OSError) as e:  # broker gone: keep serving the current model, retry
                self.last_error = f"{type(e).__name__}: {e}"
                self.retries += 1
                log.warning("checkpoint listener %s: %s; retrying in %.1fs", self.group_id, e, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            except Exception as e:  # noqa: BLE001 - unexpected: retried a few times, then fatal
                self.last_error = f"{type(e).__name__}: {e}"
                unexpected += 1
                if unexpected >= self.max_failures:
                    raise
                self.retries += 1
                log.exception("checkpoint listener %s: unexpected error (%d of %d); retrying in %.1fs",
                              self.group_id, unexpected, self.max_failures, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            finally:
                if consumer is not None:
                    try:
                        consumer.close(autocommit=False)
                    except Exception:  # noqa: BLE001 - closing a dead connection
                        pass

    def _handle(self, rec) -> None:
        try:
            ev = events_pb2.CheckpointEvent.FromString(rec.value)
        except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError and others
            self.skipped += 1
            self.last_error = f"undecodable checkpoint event at {rec.topic}[{rec.partition}]@{rec.offset}: {e}"
            log.error("%s; skipped", self.last_error)
            return
        if not ev.checkpoint_id or not ev.path:
            self.skipped += 1
            self.last_error = f"checkpoint event at {rec.topic}[{rec.partition}]@{rec.offset} has no id/path"
            log.error("%s; skipped", self.last_error)
            return
        self.received += 1
        t0 = time.perf_counter()
        try:
            self.on_checkpoint(ev)
        except Exception as e:  # noqa: BLE001 - keep serving the old checkpoint
            self.last_error = f"{type(e).__name__}: {e}"
            log.exception("switching to checkpoint %s failed; keeping the current one", ev.checkpoint_id)
            return
        log.info("checkpoint %s handled in %.2fs", ev.checkpoint_id, time.perf_counter() - t0)


def _on_a_thread_of_its_own(fn, *args):
    """fn(*args) on a thread that ends with it. Loading a model runs parallel torch ops, and the listener's
    thread lives on: its OpenMP pool would outlast the load and slow every decode step after it (s42: a
    parallel op on one other thread made steps 1.4x slower; a pool ends with its thread)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="checkpoint-load") as one:  # its exit joins the thread
        return one.submit(fn, *args).result()


def follow_checkpoints(args, server, load: Callable, service: str, on_fatal: Callable[[str], None] | None = None,
                       **listener_kw) -> CheckpointListener | None:
    """Roll a running policy/value server forward (`--kafka-bootstrap`): on every promotion of a
    checkpoint other than the one served, `load` the new model fully from the event's path and
    swap it into `server.servicer` (requests in flight finish on the old model). Each replica
    joins its own consumer group. Returns None when following is off (no bootstrap, or TGI).

    If the listener dies, the server reports NOT_SERVING and `on_fatal` runs; by default that is
    alphamath.service.fail_process, which makes the service exit non-zero (a replica that can no
    longer follow promotions would serve a stale model forever)."""
    import argparse
    import os
    import socket

    if not args.kafka_bootstrap or getattr(args, "backend", "local") != "local":
        return None

    def on_checkpoint(ev: events_pb2.CheckpointEvent) -> None:
        if ev.checkpoint_id != server.servicer.slot.checkpoint:
            fresh = argparse.Namespace(**{**vars(args), "model_dir": ev.path, "checkpoint": ev.checkpoint_id})
            server.servicer.slot.swap(_on_a_thread_of_its_own(load, fresh))

    def fatal(reason: str) -> None:
        server.grpc.set_serving(False)
        if on_fatal is not None:
            on_fatal(reason)
        else:
            from alphamath.service import fail_process
            fail_process(reason)

    group = f"{service}-{socket.gethostname()}-{os.getpid()}"
    return CheckpointListener(args.kafka_bootstrap, group, on_checkpoint, on_fatal=fatal,
                              **listener_kw).start(wait_s=None)
