"""The sandbox as production runs it, and the same containment cases against every backend.

`pod`: the sandbox service itself runs inside `runsc run` with a pod-shaped OCI bundle (read-only
root, uid 10001, no capabilities, its own network namespace; sandbox_svc.podsim), and the test
calls Execute over gRPC from outside, through a Unix socket in a bind-mounted directory.
`runsc` and `bwrap` run in-process executors named explicitly (no test relies on `auto`).
Every hostile case is followed by an execution that must still work; the table is printed at
the end of the module. A backend that fails any case must not be one production may use.
"""
from __future__ import annotations

import os
import socket

import pytest

from alphamath.sandbox.executor import STRONG_BACKENDS, WEAK_BACKENDS, Executor, SandboxUnavailable
from sandbox_svc.containment import CASES, format_table, run_cases
from sandbox_svc.podsim import CANARY_ENV, PodSandbox, remote_execute

LIMITS = dict(memory_mb=128, pids=16, cpu_s=2.0, timeout_s=4.0, max_output_bytes=1024, max_code_bytes=1 << 16)
CANARY = os.urandom(12).hex()


@pytest.fixture(scope="module")
def pod():
    with PodSandbox(pool_size=2, timeout_s=4.0) as p:
        yield p


@pytest.fixture(scope="module")
def table(request):
    results: dict[str, dict] = {}
    yield results
    if results:
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
            reporter.write_line("")
            ordered = {b: results[b] for b in ("pod", "runsc", "bwrap") if b in results}
            for line in format_table(ordered).splitlines():
                reporter.write_line(line)


@pytest.fixture(scope="module")
def host_port():
    """A listener on the host's loopback: no sandbox may reach it."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        yield srv.getsockname()[1]


# bwrap first: its RLIMIT_NPROC counts every process of uid 65534 on the host, and gVisor's own
# processes (the pod's sentry and ptrace stubs) run as that uid too.
@pytest.mark.parametrize("backend", ["bwrap", "runsc", "pod"])
def test_containment(backend, request, table, host_port, monkeypatch):
    ctx = {"host_port": host_port, "canary": CANARY}
    if backend == "pod":
        pod = request.getfixturevalue("pod")
        info = pod.info()
        ctx.update(timeout_s=info.timeout_s, max_output_bytes=info.max_output_chars, canary=pod.canary)
        with pod.channel() as ch:
            results = run_cases(remote_execute(ch), ctx)
        production = info.production
    else:
        monkeypatch.setenv(CANARY_ENV, CANARY)  # the service's environment must not reach the code
        with Executor(backend=backend, allow_weak=backend in WEAK_BACKENDS, **LIMITS) as ex:
            ctx.update(timeout_s=ex.limits.timeout_s, max_output_bytes=ex.limits.max_output_bytes)
            results = run_cases(ex.execute, ctx)
            production = ex.info()["production"]
    table[backend] = results
    assert set(results) == {c.name for c in CASES}
    failed = {name: problem for name, problem in results.items() if problem is not None}
    if backend in STRONG_BACKENDS:
        assert production is True
        assert not failed, format_table({backend: results})
    else:
        # A weak backend (whatever it failed is in the table) is never chosen by auto, refuses to
        # start without the explicit flag, and says it is not for production.
        assert backend in WEAK_BACKENDS and production is False
        with pytest.raises(SandboxUnavailable, match="weaker than gVisor"):
            Executor(backend=backend, **LIMITS)


def test_pod_service_runs_under_gvisor_as_the_pod_uid_and_names_its_backend(pod):
    info = pod.info()
    assert (info.backend, info.strength, info.production) == ("pod", "gvisor", True)
    assert info.max_concurrency == 1  # executions share the pod's uid: one at a time (the `neighbour` case)
    with pod.channel() as ch:
        execute = remote_execute(ch)
        r = execute(["x = 6", "print(x * 7)"])
        assert (r.stdout, r.error, r.backend) == ("42\n", None, "pod")
        r = execute(["import os\nprint(os.getuid(), os.getgid(), open('/proc/version').read().split()[2])"])
        assert r.stdout == "10001 10001 4.4.0\n", r  # gVisor's fixed kernel version: the service is inside it
        r = execute(["import os\nprint(os.access('/', os.W_OK), os.access('/usr/bin', os.W_OK))"])
        assert r.stdout == "False False\n", r  # the pod's root is read-only


def test_auto_inside_gvisor_chooses_the_pod_backend():
    """`auto` picks among the equally strong backends: inside a gVisor pod that is `pod` (runsc
    cannot start there); no test of containment relies on it."""
    with PodSandbox(pool_size=0, extra_args=("--backend", "auto")) as p:
        info = p.info()
        assert (info.backend, info.strength, info.production) == ("pod", "gvisor", True)
