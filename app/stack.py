"""The local stack: policy (local backend), value, sandbox and search as loopback processes.

    python -m app.stack run  [--data FILE --limit 3 --method sbs]   # `make run`
    python -m app.stack stop                                          # `make stop`
    python -m app.stack status

`run` materialises the embedded checkpoint once (policy and value load the same directory),
starts each service as `python -m <svc>` in its own session with its log in var/<svc>.log and a
pid file var/<svc>.pid, waits until every service answers its gRPC health check, then solves a
few problems through SearchService and prints them. The services keep running; `stop` signals
exactly the processes named in the pid files (after checking that each pid still runs the
module it was started as, so a recycled pid is never hit), SIGKILLs what does not exit in time,
and removes the pid files.

Environment: ALPHAMATH_MODEL_DIR (default: the embedded SmolLM2 checkpoint) and every service's
own ALPHAMATH_* variables pass through to the services.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from alphamath.service import GRPC_PORTS, METRICS_PORTS, TGI_HTTP_PORT

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("sandbox", "value", "policy", "search")  # start order: search last, after its dependencies
# With a Kafka bootstrap the stack can also run the trainer (ingestion into its store); search then
# publishes GenerateTrees trees and policy/value follow promoted checkpoints.
ALL_SERVICES = (*SERVICES, "trainer")
MODULES = {name: f"{name}_svc" for name in ALL_SERVICES}


class StackError(RuntimeError):
    pass


@dataclass
class Ports:
    grpc: dict[str, int]
    metrics: dict[str, int]
    http: int = TGI_HTTP_PORT

    @classmethod
    def standard(cls) -> "Ports":
        return cls({k: GRPC_PORTS[k] for k in ALL_SERVICES}, {k: METRICS_PORTS[k] for k in ALL_SERVICES})

    @classmethod
    def free(cls) -> "Ports":
        """Free loopback ports for every service (tests and benchmarks that start their own stack)."""
        p = free_ports(2 * len(ALL_SERVICES) + 1)
        n = len(ALL_SERVICES)
        return cls(dict(zip(ALL_SERVICES, p[:n])), dict(zip(ALL_SERVICES, p[n:2 * n])), http=p[2 * n])

    def addr(self, service: str, host: str = "127.0.0.1") -> str:
        return f"{host}:{self.grpc[service]}"


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (for tests and benchmarks that start their own stack)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pid_alive_as(pid: int, module: str) -> bool:
    """True if `pid` is running `python -m module` (not a recycled pid of something else)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        state = ""
    return state != "Z" and b"-m" in cmdline and module.encode() in cmdline


class LocalStack:
    """Start, health-check and stop the services of one stack (state under `var_dir`)."""

    def __init__(self, var_dir: str | Path = ROOT / "var", *, ports: Ports | None = None,
                 model_dir: str | Path | None = None, host: str = "127.0.0.1",
                 env: dict[str, str] | None = None, services: tuple[str, ...] = SERVICES,
                 kafka_bootstrap: str | None = None, db_url: str | None = None, db_schema: str | None = None):
        if "trainer" in services and not kafka_bootstrap:
            raise ValueError("the trainer needs kafka_bootstrap (it ingests trees from Kafka)")
        self.kafka_bootstrap, self.db_url, self.db_schema = kafka_bootstrap, db_url, db_schema
        self.var = Path(var_dir)
        self.ports = ports or Ports.standard()
        self.model_dir = Path(model_dir) if model_dir else None
        self.host, self.extra_env, self.services = host, dict(env or {}), services
        self._procs: dict[str, subprocess.Popen] = {}  # the processes this instance started

    # -- files ------------------------------------------------------------------------------
    def pidfile(self, service: str) -> Path:
        return self.var / f"{service}.pid"

    def logfile(self, service: str) -> Path:
        return self.var / f"{service}.log"

    def _read_pid(self, service: str) -> int | None:
        try:
            return int(json.loads(self.pidfile(service).read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _alive(self, service: str, pid: int) -> bool:
        """A process this instance started is judged by its Popen handle; others by /proc."""
        proc = self._procs.get(service)
        if proc is not None and proc.pid == pid:
            return proc.poll() is None
        return _pid_alive_as(pid, MODULES[service])

    def running(self) -> dict[str, int]:
        """Services whose pid file names a live process of that service."""
        out = {}
        for s in ALL_SERVICES:
            pid = self._read_pid(s)
            if pid is not None and self._alive(s, pid):
                out[s] = pid
        return out

    # -- start ------------------------------------------------------------------------------
    def _command(self, service: str) -> list[str]:
        cmd = [sys.executable, "-m", MODULES[service], "--host", self.host,
               "--port", str(self.ports.grpc[service]), "--metrics-port", str(self.ports.metrics[service])]
        if service == "search":
            cmd += ["--policy-addr", self.ports.addr("policy"), "--value-addr", self.ports.addr("value"),
                    "--sandbox-addr", self.ports.addr("sandbox")]
        if self.kafka_bootstrap and service in ("search", "policy", "value", "trainer"):
            cmd += ["--kafka-bootstrap", self.kafka_bootstrap]
        if service == "trainer":
            cmd += ["--checkpoint-dir", str(self.var / "checkpoints")]
            if self.db_url:
                cmd += ["--db-url", self.db_url]
            if self.db_schema:
                cmd += ["--db-schema", self.db_schema]
        return cmd

    def _env(self, service: str) -> dict[str, str]:
        env = {**os.environ, **self.extra_env, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        if self.model_dir is not None:
            env["ALPHAMATH_MODEL_DIR"] = str(self.model_dir)
        if service == "sandbox":  # a host: gVisor by name, so a missing runsc is an error, not a guess
            env.setdefault("ALPHAMATH_SANDBOX_BACKEND", "runsc")
        if service in ("policy", "value"):  # two model processes on the same cores: compute in turns (lm/lock.py)
            env.setdefault("ALPHAMATH_COMPUTE_LOCK", str(self.var / "compute.lock"))
        if service == "policy":
            env.setdefault("ALPHAMATH_POLICY_BACKEND", "local")
            env["ALPHAMATH_POLICY_HTTP_PORT"] = str(self.ports.http)
        return env

    def start(self, timeout_s: float = 600.0) -> dict[str, int]:
        """Start every service not already running, then wait for all to be healthy."""
        self.var.mkdir(parents=True, exist_ok=True)
        if self.model_dir is None and "ALPHAMATH_MODEL_DIR" not in {**os.environ, **self.extra_env}:
            from alphamath.model import embedded_checkpoint
            self.model_dir = Path(embedded_checkpoint())
        already = self.running()
        for service in self.services:
            if service in already:
                print(f"{service:8s} already running (pid {already[service]})", file=sys.stderr)
                continue
            log = self.logfile(service).open("ab")
            try:
                proc = subprocess.Popen(self._command(service), cwd=ROOT, env=self._env(service),
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            finally:
                log.close()
            self._procs[service] = proc
            self.pidfile(service).write_text(json.dumps({"pid": proc.pid, "module": MODULES[service],
                                                         "port": self.ports.grpc[service]}))
            print(f"{service:8s} started (pid {proc.pid}, {self.ports.addr(service, self.host)}, "
                  f"log {self.logfile(service)})", file=sys.stderr)
        self.wait_healthy(timeout_s)
        return self.running()

    def wait_healthy(self, timeout_s: float = 600.0) -> None:
        """Poll each service's gRPC health until SERVING; fail early if one of them exited."""
        from app.client import health

        deadline = time.monotonic() + timeout_s
        pending = list(self.services)
        while pending:
            for service in list(pending):
                pid = self._read_pid(service)
                if pid is None or not self._alive(service, pid):
                    raise StackError(f"{service} exited during start-up; last lines of {self.logfile(service)}:\n"
                                     + self.log_tail(service))
                status = health({service: self.ports.addr(service, self.host)}, timeout_s=1.0)[service]
                if status == "SERVING":
                    pending.remove(service)
                    print(f"{service:8s} healthy", file=sys.stderr)
            if pending and time.monotonic() > deadline:
                raise StackError(f"not healthy after {timeout_s:.0f} s: {', '.join(pending)} (see {self.var}/*.log)")
            if pending:
                time.sleep(0.3)

    def log_tail(self, service: str, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile(service).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self, service: str) -> int:
        """SIGKILL one service (fault tests) and wait until it is gone; returns its pid."""
        pid = self._read_pid(service)
        if pid is None or not self._alive(service, pid):
            raise StackError(f"{service} is not running")
        os.killpg(pid, signal.SIGKILL)  # its own session: the service and its children (sandboxes)
        proc = self._procs.get(service)
        if proc is not None and proc.pid == pid:
            proc.wait(30)
        else:
            deadline = time.monotonic() + 30
            while _pid_alive_as(pid, MODULES[service]) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.pidfile(service).unlink(missing_ok=True)
        return pid

    def exit_code(self, service: str) -> int | None:
        """The exit status of a service this instance started (None while it runs)."""
        proc = self._procs.get(service)
        return None if proc is None else proc.poll()

    # -- stop -------------------------------------------------------------------------------
    def stop(self, timeout_s: float = 15.0, services: tuple[str, ...] | None = None) -> list[str]:
        """SIGTERM the processes named in the pid files (search first), SIGKILL leftovers."""
        stopped = []
        targets = {}
        for service in reversed(services or ALL_SERVICES):
            pid = self._read_pid(service)
            if pid is None:
                continue
            if self._alive(service, pid):
                os.kill(pid, signal.SIGTERM)
                targets[service] = pid
            else:
                self.pidfile(service).unlink(missing_ok=True)  # stale: the process is gone already
        deadline = time.monotonic() + timeout_s
        for service, pid in targets.items():
            while self._alive(service, pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._alive(service, pid):
                print(f"{service:8s} did not exit in {timeout_s:.0f} s; killing it", file=sys.stderr)
                try:
                    os.killpg(pid, signal.SIGKILL)  # its own session: the service and its children
                except ProcessLookupError:
                    pass
            self.pidfile(service).unlink(missing_ok=True)
            stopped.append(service)
            print(f"{service:8s} stopped (pid {pid})", file=sys.stderr)
        return stopped


def demo(addr: str, data: str | Path, limit: int, method: str, parameters: dict, timeout_s: float) -> int:
    """Solve `limit` problems of `data` through SearchService and print them; returns #correct."""
    import grpc

    from app.client import format_response, solve
    from alphamath.data import load_problems

    correct = 0
    for p in load_problems(data, limit):
        start = time.perf_counter()
        try:
            resp = solve(addr, p.question, method, parameters, timeout_s, ground_truth=p.answer, question_id=p.id)
        except grpc.RpcError as e:
            print(f"[{p.id}] failed: {e.code().name}: {e.details()}\n")
            continue
        correct += bool(resp.correct)
        print(f"[{p.id}] ({time.perf_counter() - start:.1f} s through gRPC)")
        print(format_response(resp, p.question, p.answer) + "\n")
    return correct


# Small search settings so `make run` finishes in minutes on a CPU.
DEMO_PARAMETERS = {"sbs": dict(beam_b1=2, beam_b2=2, max_new_tokens=160, max_depth=6),
                   "mcts": dict(iterations=8, n_children=3, max_new_tokens=160, max_depth=6),
                   "majority": dict(majority_k=3, max_new_tokens=160, max_depth=6),
                   "greedy": dict(max_new_tokens=160, max_depth=6)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m app.stack", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["run", "start", "stop", "status"])
    ap.add_argument("--var", default=str(ROOT / "var"), help="pid files and logs")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gsm8k" / "dev.jsonl"))
    ap.add_argument("--limit", type=int, default=3, help="problems solved by `run`")
    ap.add_argument("--method", default="sbs", choices=sorted(DEMO_PARAMETERS))
    ap.add_argument("--timeout", type=float, default=900.0, help="deadline per problem, seconds")
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    a = ap.parse_args(argv)
    stack = LocalStack(a.var)
    try:
        if a.action == "stop":
            if not stack.stop():
                print("nothing to stop", file=sys.stderr)
            return 0
        if a.action == "status":
            from app.client import health
            running = stack.running()
            status = health({s: stack.ports.addr(s) for s in SERVICES})
            for s in SERVICES:
                print(f"{s:8s} pid {running.get(s, '-')!s:8s} {status[s]}")
            return 0 if len(running) == len(SERVICES) else 1
        stack.start(a.startup_timeout)
        if a.action == "run":
            print(f"\nstack is up; solving {a.limit} problems from {a.data} with {a.method} through gRPC "
                  f"({stack.ports.addr('search')})\n", file=sys.stderr)
            demo(stack.ports.addr("search"), a.data, a.limit, a.method, DEMO_PARAMETERS[a.method], a.timeout)
            print("services are still running: `make stop` ends them", file=sys.stderr)
        return 0
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        print("stopping what was started", file=sys.stderr)
        stack.stop()
        return 1


if __name__ == "__main__":
    sys.exit(main())
