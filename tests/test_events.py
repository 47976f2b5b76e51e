"""Events over the real tansu broker: tree publishing, checkpoint promotion reaching listeners."""
from __future__ import annotations

import threading
import time

import pytest
from kafka import KafkaConsumer

from alphamath.convert import tree_from_event
from alphamath.events import CheckpointListener, CheckpointPublisher, TreePublisher
from alphamath.pb import events_pb2
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


def _wait(cond, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.1)
    return cond()


def _serve(kind, model_dir, bootstrap, topic):
    """The real policy or value server on the tiny model, wired to follow checkpoints exactly as
    `python -m policy_svc|value_svc --kafka-bootstrap ...` is."""
    import importlib

    main = importlib.import_module(f"{kind}_svc.__main__")
    args = main.build_parser().parse_args(["--model-dir", str(model_dir), "--port", "0", "--checkpoint", "embedded",
                                           "--kafka-bootstrap", bootstrap])
    server_cls = getattr(importlib.import_module(f"{kind}_svc.server"), f"{kind.capitalize()}Server")
    kw = {"http_port": -1} if kind == "policy" else {}
    server = server_cls(main.load(args), host="127.0.0.1", port=0, **kw)
    from alphamath.events import follow_checkpoints

    listener = follow_checkpoints(args, server, main.load, kind, topic=topic, consumer_config=FAST_GROUP)
    return server, listener


def test_checkpoint_event_reaches_policy_and_value_services(broker, topics, tiny_model_dir, tmp_path):
    import shutil

    import grpc

    from alphamath.pb import policy_pb2, policy_pb2_grpc, value_pb2, value_pb2_grpc

    promoted = tmp_path / "round-1"
    shutil.copytree(tiny_model_dir, promoted)
    running = [_serve(kind, tiny_model_dir, broker.bootstrap, topics.checkpoints) for kind in ("policy", "value")]
    try:
        assert _wait(lambda: all(lis.ready for _, lis in running))
        with CheckpointPublisher(broker.bootstrap, topic=topics.checkpoints) as pub:
            pub.publish("r1", str(promoted), round=1, parent="embedded", metrics={"greedy_acc": 0.5})
        assert _wait(lambda: all(srv.servicer.loaded.checkpoint == "r1" for srv, _ in running), 60)
        stubs = ((policy_pb2_grpc.PolicyServiceStub, policy_pb2.InfoRequest()),
                 (value_pb2_grpc.ValueServiceStub, value_pb2.ValueInfoRequest()))
        for (srv, _), (stub_cls, request) in zip(running, stubs):
            with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                assert stub_cls(ch).Info(request, timeout=10).checkpoint == "r1"
        # a checkpoint that cannot be loaded leaves the current one serving
        with CheckpointPublisher(broker.bootstrap, topic=topics.checkpoints) as pub:
            pub.publish("r2", str(tmp_path / "missing"), round=2, parent="r1")
        assert _wait(lambda: all(lis.last_error for _, lis in running), 30)
        assert all(srv.servicer.loaded.checkpoint == "r1" for srv, _ in running)
    finally:
        for srv, lis in running:
            lis.stop()
            srv.stop(0)


def test_restarted_listener_catches_up_with_latest_promotion(broker, topics):
    with CheckpointPublisher(broker.bootstrap, topic=topics.checkpoints) as pub:
        pub.publish("r1", "/ckpt/r1", round=1)
        pub.publish("r2", "/ckpt/r2", round=2, parent="r1")
    seen = []
    lis = CheckpointListener(broker.bootstrap, f"late-{topics.trees}", lambda ev: seen.append(ev.checkpoint_id),
                             topic=topics.checkpoints, consumer_config=FAST_GROUP).start()
    try:
        assert _wait(lambda: seen == ["r2"])  # only the promotion in force is replayed
    finally:
        lis.stop()


def test_listener_skips_and_commits_past_a_bad_event(broker, topics):
    """An undecodable checkpoint event is logged, counted and committed past; the next
    promotion is still handled, and a restarted listener does not read the bad one again."""
    from kafka import KafkaProducer

    seen = []
    group = f"bad-{topics.trees}"
    lis = CheckpointListener(broker.bootstrap, group, lambda ev: seen.append(ev.checkpoint_id),
                             topic=topics.checkpoints, consumer_config=FAST_GROUP, replay_latest=False).start()
    try:
        raw = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        raw.send(topics.checkpoints, key=b"junk", value=b"\xff\x00 not a CheckpointEvent").get(10)
        raw.close()
        with CheckpointPublisher(broker.bootstrap, topic=topics.checkpoints) as pub:
            pub.publish("r1", "/ckpt/r1", round=1)
        assert _wait(lambda: seen == ["r1"])
        assert lis.skipped == 1 and "undecodable checkpoint event" in lis.last_error
        assert not lis.failed.is_set()
    finally:
        lis.stop()
    again = CheckpointListener(broker.bootstrap, group, lambda ev: seen.append(ev.checkpoint_id),
                               topic=topics.checkpoints, consumer_config=FAST_GROUP, replay_latest=False).start()
    try:
        with CheckpointPublisher(broker.bootstrap, topic=topics.checkpoints) as pub:
            pub.publish("r2", "/ckpt/r2", round=2)
        assert _wait(lambda: seen == ["r1", "r2"])
        assert again.skipped == 0  # the bad event's offset was committed
    finally:
        again.stop()


def test_listener_that_keeps_failing_turns_the_service_not_serving(broker, topics, monkeypatch):
    """Unexpected errors (here from a consumer factory that always raises: a fake neighbour) are
    retried a few times; then the listener gives up, the server reports NOT_SERVING and the
    fatal callback runs (in the services: alphamath.service.fail_process, exit status 1)."""
    import argparse

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from alphamath.events import follow_checkpoints
    from alphamath.service import GrpcServer

    def broken(self):
        raise RuntimeError("consumer cannot be built")

    monkeypatch.setattr(CheckpointListener, "_consumer", broken)
    server = argparse.Namespace(grpc=GrpcServer(lambda s: None, ["alphamath.v1.PolicyService"], port=0,
                                                host="127.0.0.1"))
    fatal = threading.Event()
    reasons = []
    args = argparse.Namespace(kafka_bootstrap=broker.bootstrap, backend="local")
    lis = follow_checkpoints(args, server, load=None, service="policy",
                             on_fatal=lambda r: (reasons.append(r), fatal.set()), topic=topics.checkpoints,
                             max_failures=3, max_backoff_s=0.05)
    try:
        assert fatal.wait(30) and lis.failed.is_set() and lis.retries == 2
        assert "consumer cannot be built" in reasons[0]
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc.port}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        lis.stop()
        server.grpc.stop(0)


def test_fail_process_makes_a_service_exit_non_zero(tmp_path):
    """fail_process in a service's background thread: the process shuts down as on SIGTERM and
    exits with status 1 (what Kubernetes needs to restart it)."""
    import subprocess
    import sys

    code = ("import threading\n"
            "from alphamath.service import fail_process, run_until_signal\n"
            "def work(done):  # runs once the signal handlers are installed\n"
            "    threading.Thread(target=fail_process, args=('listener died',)).start()\n"
            "    done.wait()\n"
            "run_until_signal(lambda: print('stopped', flush=True), work=work)\n"
            "print('not reached')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == "stopped\n" and "listener died" in proc.stderr


def test_a_checkpoint_loads_on_a_thread_that_ends_with_the_load():
    """The listener's thread lives on; the load's OpenMP pool must not (alphamath/lm/scheduler.py)."""
    from alphamath.events import _on_a_thread_of_its_own

    threads = []

    def load(x):
        threads.append(threading.current_thread())
        if x == "bad":
            raise ValueError("no such checkpoint")
        return x + "!"

    assert _on_a_thread_of_its_own(load, "ok") == "ok!"
    with pytest.raises(ValueError, match="no such checkpoint"):
        _on_a_thread_of_its_own(load, "bad")
    assert all(t is not threading.current_thread() and not t.is_alive() for t in threads) and len(threads) == 2
