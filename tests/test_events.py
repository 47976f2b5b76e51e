"""Events over the real tansu broker: tree publishing, checkpoint promotion reaching listeners."""
from __future__ import annotations

import threading
import time

import pytest
from kafka import KafkaConsumer

from alphamath.convert import tree_from_event
from alphamath.events import CheckpointListener, CheckpointPublisher, TreePublisher
from alphamath.pb import events_pb2
from alphamath.slot import ModelSlot
from tests.pipeline import FAST_GROUP, broker, make_tree, topics  # noqa: F401 - fixtures


def read_all(bootstrap, topic, n, timeout_s=10):
    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                      enable_auto_commit=False, group_id=None, consumer_timeout_ms=int(timeout_s * 1000))
    out = []
    for rec in c:
        out.append(rec)
        if len(out) >= n:
            break
    c.close()
    return out


def test_tree_published_with_key_and_acknowledged(broker, topics):
    tree = make_tree("gsm8k-17")
    with TreePublisher(broker.bootstrap, topic=topics.trees) as pub:
        ev = pub.publish(tree, checkpoint="ckpt-3", search_config={"iterations": 4})
    [rec] = read_all(broker.bootstrap, topics.trees, 1)  # already durable when publish returned
    assert rec.key == b"gsm8k-17"
    got = events_pb2.TreeEvent.FromString(rec.value)
    assert got.event_id == ev.event_id and got.checkpoint == "ckpt-3"
    assert tree_from_event(got).to_dict() == tree.to_dict()
    with TreePublisher(broker.bootstrap, topic=topics.trees) as pub, pytest.raises(ValueError, match="question_id"):
        tree.question_id = None
        pub.publish(tree, checkpoint="c")


class RecordingLoader:
    """Stands in for LocalLM loading (the slot's neighbour): records loads, can fail or be slow."""

    def __init__(self, delay=0.0, fail=()):
        self.loaded, self.delay, self.fail = [], delay, set(fail)

    def __call__(self, path):
        time.sleep(self.delay)
        if path in self.fail:
            raise FileNotFoundError(path)
        self.loaded.append(path)
        return f"lm<{path}>"


def test_checkpoint_event_reaches_policy_and_value_listeners(broker, topics):
    slots = {name: ModelSlot("/base", "embedded", loader=RecordingLoader()) for name in ("policy", "value")}
    listeners = [CheckpointListener(broker.bootstrap, f"{name}-test-{topics.trees}", slot.on_checkpoint,
                                    topic=topics.checkpoints, consumer_config=FAST_GROUP).start()
                 for name, slot in slots.items()]
    try:
        with CheckpointPublisher(broker.bootstrap, topic=topics.checkpoints) as pub:
            pub.publish("r1", "/ckpt/r1", round=1, parent="embedded", metrics={"greedy_acc": 0.5})
        deadline = time.monotonic() + 15
        while any(s.checkpoint != "r1" for s in slots.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for s in slots.values():
            assert (s.checkpoint, s.current().path, s.lm) == ("r1", "/ckpt/r1", "lm</ckpt/r1>")
    finally:
        for lis in listeners:
            lis.stop()


def test_restarted_listener_catches_up_with_latest_promotion(broker, topics):
    with CheckpointPublisher(broker.bootstrap, topic=topics.checkpoints) as pub:
        pub.publish("r1", "/ckpt/r1", round=1)
        pub.publish("r2", "/ckpt/r2", round=2, parent="r1")
    loader = RecordingLoader(fail={"/ckpt/bad"})
    slot = ModelSlot("/base", "embedded", loader=loader)
    lis = CheckpointListener(broker.bootstrap, f"late-{topics.trees}", slot.on_checkpoint,
                             topic=topics.checkpoints, consumer_config=FAST_GROUP).start()
    try:
        deadline = time.monotonic() + 15
        while slot.checkpoint != "r2" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert slot.checkpoint == "r2"
        assert loader.loaded == ["/base", "/ckpt/r2"]  # only the promotion in force was loaded
        # a checkpoint that fails to load leaves the current one serving
        with CheckpointPublisher(broker.bootstrap, topic=topics.checkpoints) as pub:
            pub.publish("r3", "/ckpt/bad", round=3)
        deadline = time.monotonic() + 15
        while lis.last_error is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "FileNotFoundError" in lis.last_error and slot.checkpoint == "r2"
    finally:
        lis.stop()


def test_swap_loads_fully_before_switching_and_in_flight_requests_keep_their_model():
    loader = RecordingLoader()
    slot = ModelSlot("/base", "embedded", loader=loader)
    in_flight = slot.current()
    loader.delay = 0.3
    t = threading.Thread(target=slot.swap, args=("/ckpt/r1", "r1"))
    t.start()
    time.sleep(0.1)
    assert slot.checkpoint == "embedded"  # still loading: requests keep getting the old model
    t.join()
    assert (slot.checkpoint, slot.lm) == ("r1", "lm</ckpt/r1>")
    assert (in_flight.checkpoint, in_flight.lm) == ("embedded", "lm</base>")
    assert slot.swap("/ckpt/r1", "r1") is False and slot.swaps == 1
