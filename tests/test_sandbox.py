"""Containment tests of the code sandbox against the real gVisor runsc (and bwrap, the weak backend
that runs only when named with allow_weak; the pod backend: tests/test_sandbox_containment.py).

Every test runs real code in a real sandbox: nothing here is faked. The hostile cells (fork bomb,
memory bomb, infinite loop, output flood) are each followed by a normal execution to prove the
executor survives them.
"""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from alphamath.sandbox.executor import Executor, SandboxUnavailable

REPO = Path(__file__).resolve().parents[1]

LIMITS = dict(memory_mb=128, pids=16, cpu_s=2.0, timeout_s=4.0, max_output_bytes=1024, max_code_bytes=8192)

HOST_FILES_CELL = f"""
import os
for path in ("/etc/shadow", "/etc/passwd", {str(REPO / "pyproject.toml")!r}, "/root/.bashrc"):
    try:
        open(path).read()
        print("READ", path)
    except OSError as e:
        print("denied", type(e).__name__)
for d in ({str(REPO)!r}, "/root", "/work", "/home"):
    try:
        print("LISTED", d, os.listdir(d))
    except OSError as e:
        print("denied", type(e).__name__)
"""

WRITE_CELL = """
for path in ("/usr/pwned", "/pwned", "/etc/pwned", "/usr/lib/python3/dist-packages/pwned.py"):
    try:
        open(path, "w").write("x")
        print("WROTE", path)
    except OSError as e:
        print("denied", type(e).__name__)
with open("/tmp/scratch.txt", "w") as f:
    f.write("scratch ok")
print(open("/tmp/scratch.txt").read())
"""

IDENTITY_CELL = """
import os
status = open("/proc/self/status").read()
caps = [l.split()[1] for l in status.splitlines() if l.startswith(("CapEff", "CapPrm", "CapBnd"))]
print(os.getuid(), os.getgid(), sorted(set(caps)))
"""

FORK_BOMB = "import os\nwhile True:\n    os.fork()"
MEMORY_BOMB = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))"
INFINITE_LOOP = "while True:\n    pass"
OUTPUT_FLOOD = "for _ in range(1_000_000):\n    print('x' * 99)"  # 100 MB, streamed


def network_cell(port: int) -> str:
    return f"""
import socket
import subprocess
for host, port in (("127.0.0.1", {port}), ("1.1.1.1", 53), ("1.1.1.1", 443)):
    try:  # the runner's seccomp filter already refuses socket(); the sandbox has no network anyway
        with socket.socket() as s:
            s.settimeout(1.0)
            s.connect((host, port))
            print("CONNECTED", host, port)
    except OSError as e:
        print("blocked", type(e).__name__)
"""


@pytest.fixture(scope="module")
def runsc():
    with Executor(backend="runsc", **LIMITS) as ex:
        yield ex


@pytest.fixture(scope="module")
def bwrap():
    with Executor(backend="bwrap", allow_weak=True, **LIMITS) as ex:
        yield ex


@pytest.fixture
def host_listener():
    """A server on the host's loopback: the sandbox must not reach it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    yield srv.getsockname()[1]
    srv.close()


def assert_still_works(ex: Executor) -> None:
    r = ex.execute(["print('still alive')"])
    assert (r.stdout, r.error, r.timed_out) == ("still alive\n", None, False)


# ---------------------------------------------------------------------------------------- runsc


def test_runsc_is_the_backend_and_prints(runsc):
    assert runsc.backend == "runsc"
    r = runsc.execute(["print(6 * 7)"])
    assert (r.stdout, r.error, r.timed_out) == ("42\n", None, False)
    assert 0 < r.duration_s < LIMITS["timeout_s"]


def test_state_is_rebuilt_and_only_last_output_kept(runsc):
    r = runsc.execute(["x = 20\nprint('early output')", "y = x + 1\nimport os; os.write(1, b'raw')", "print(x + y)"])
    assert (r.stdout, r.error) == ("41\n", None)


def test_error_is_last_traceback_line(runsc):
    r = runsc.execute(["a = 1", "print('before')\nprint(x)"])
    assert r.stdout == "before\n"
    assert r.error == "NameError: name 'x' is not defined"
    assert not r.timed_out
    assert runsc.execute(["1/0", "print('ok')"]).error is None  # earlier errors are not reported
    assert runsc.execute(["def f(:"]).error.startswith("SyntaxError")
    code = "raise ValueError('na\u00efve \u2603 \"q\" \\\\ \U0001F600')"  # non-ASCII, quotes, a backslash
    assert runsc.execute([code]).error == 'ValueError: na\u00efve \u2603 "q" \\ \U0001F600'


def _runner_module():
    """runner.py as a module (it runs inside the sandbox; here only its pure functions are called)."""
    import importlib.util

    from alphamath.sandbox import executor

    spec = importlib.util.spec_from_file_location("sandbox_runner", Path(executor.__file__).with_name("runner.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_runner_writes_its_status_as_json_dumps_does():
    """runner.py writes the status line by hand (importing json under gVisor's ptrace platform cost
    ~30 ms of CPU per execution together with socket and traceback); it must be json.dumps' text."""
    import json

    runner = _runner_module()
    values = [None, True, False, 0, -3, 0.125, 1e-07, 12.5, "", "plain", 'quo"te \\ back', "\n\r\t\b\f\x00\x1f\x7f",
              "na\u00efve \u20ac", "\U0001F600", "\ud800 lone", "".join(map(chr, range(0, 300)))]
    for v in values:
        assert runner._json(v) == json.dumps(v)
    status = {"error": "ValueError: \u2603\n", "timed_out": False, "exit": -9, "cpu_s": 0.031, "swept": True}
    assert runner._json(status) == json.dumps(status) and json.loads(runner._json(status)) == status
    with pytest.raises(TypeError):
        runner._json([1])


def test_the_runner_reads_the_workers_last_well_formed_report_line():
    """The worker's report is a hex line ("e" + hex, or "n"); lines the model's code forged before
    it, and malformed lines, do not win over the last well-formed one."""
    runner = _runner_module()

    def read(data: bytes):
        r, w = os.pipe()
        os.write(w, data)
        os.close(w)
        return runner._read_report(r)

    err = "ZeroDivisionError: division by zero \u2603"
    assert read(runner._report_line(err)) == err
    assert read(b"e" + b"41".hex().encode() + b"\n" + runner._report_line(None)) is None
    assert read(b"garbage\n" + runner._report_line(err) + b"ezz\nefff\n") == err
    assert read(b"") is None
    assert read(b"x" * (runner.ERROR_REPORT_CAP + 1)).startswith("SandboxError: the code wrote more than")


def test_numpy_and_sympy_import(runsc):
    r = runsc.execute(
        [
            "import numpy as np\nimport sympy as sp",
            "x = sp.symbols('x')\nprint(sp.solve(x**2 - 4, x), int(np.arange(5).sum()))",
        ]
    )
    assert (r.stdout, r.error) == ("[-2, 2] 10\n", None)


def test_runs_unprivileged(runsc):
    r = runsc.execute([IDENTITY_CELL])
    assert r.stdout == "65534 65534 ['0000000000000000']\n", r


def test_no_network(runsc, host_listener):
    r = runsc.execute([network_cell(host_listener)])
    assert r.error is None and "CONNECTED" not in r.stdout
    assert r.stdout.count("blocked") == 3, r.stdout


def test_cannot_read_host_files(runsc):
    r = runsc.execute([HOST_FILES_CELL])
    assert r.error is None
    assert "READ" not in r.stdout and "LISTED" not in r.stdout
    assert r.stdout.count("denied") == 8, r.stdout


def test_cannot_write_outside_tmp(runsc):
    r = runsc.execute([WRITE_CELL])
    assert r.error is None
    assert "WROTE" not in r.stdout
    assert r.stdout.count("denied") == 4 and r.stdout.endswith("scratch ok\n"), r.stdout


def test_fork_bomb_is_stopped(runsc):
    r = runsc.execute([FORK_BOMB])
    assert r.error, r
    assert r.duration_s < LIMITS["timeout_s"] + 5
    assert_still_works(runsc)


def test_memory_bomb_is_stopped(runsc):
    r = runsc.execute([MEMORY_BOMB])
    assert r.error and ("MemoryError" in r.error or "SandboxError" in r.error), r
    assert_still_works(runsc)


def test_infinite_loop_times_out(runsc):
    r = runsc.execute(["print('started')", INFINITE_LOOP])
    assert r.timed_out and r.error, r
    assert r.duration_s < LIMITS["timeout_s"] + 5
    assert_still_works(runsc)


def test_output_flood_is_cut(runsc):
    r = runsc.execute([OUTPUT_FLOOD])
    assert r.error.startswith("OutputLimitExceeded"), r
    assert len(r.stdout) <= LIMITS["max_output_bytes"] + 64
    assert_still_works(runsc)


def test_long_output_is_truncated(runsc):
    r = runsc.execute(["print('y' * 5000)"])
    assert r.error is None
    assert r.stdout.startswith("y" * 1024) and r.stdout.endswith("[output truncated]")
    assert len(r.stdout) <= LIMITS["max_output_bytes"] + 64


def test_oversized_code_is_rejected(runsc):
    with pytest.raises(ValueError, match="max_code_bytes"):
        runsc.execute(["x = 1", "#" * 9000])
    with pytest.raises(TypeError):
        runsc.execute("print(1)")
    assert runsc.execute([]).stdout == ""


def test_concurrent_executions_are_isolated_and_cleaned_up(runsc):
    results = {}

    def run(i):
        results[i] = runsc.execute([f"v = {i}", "import os; print(v, os.listdir('/tmp'))"])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: r.stdout for i, r in results.items()} == {i: f"{i} []\n" for i in range(3)}
    assert runsc.drain(60)  # teardown runs in the background
    backend = runsc._backend
    idle = sorted(w.id for w in backend._idle)
    assert 1 <= len(idle) <= 3  # three ran at once; the sandboxes that served them wait for the next
    # container state and bundles: exactly the idle sandboxes', nothing of the executions'
    assert sorted({p.name.split("_")[0] for p in backend.state.iterdir()}) == idle
    assert sorted(p.name for p in backend.workdir.iterdir()) == sorted(["rootfs", "state", "process.json", *idle])


def test_cgroup_limits_are_applied(runsc):
    """The whole gVisor sandbox (sentry included) sits in a cgroup with memory and pids limits."""
    parent = runsc._backend.cgroup_parent
    seen = []

    def watch():
        for _ in range(40):
            for pids_max in Path("/sys/fs/cgroup/pids" + parent).glob("*/pids.max"):
                memory = Path("/sys/fs/cgroup/memory" + parent) / pids_max.parent.name / "memory.limit_in_bytes"
                seen.append((int(pids_max.read_text()), int(memory.read_text())))
            if seen:
                return
            threading.Event().wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    r = runsc.execute(["import time; time.sleep(1.5); print('slept')"])
    watcher.join()
    assert r.stdout == "slept\n"
    assert seen, "no per-sandbox cgroup found under " + parent
    pids_max, memory_limit = seen[0]
    assert pids_max <= LIMITS["pids"] + 256
    assert memory_limit <= (LIMITS["memory_mb"] << 20) + (512 << 20)


@pytest.mark.parametrize("pool_size", [0, 1])
def test_a_reused_sandbox_carries_nothing_over(pool_size):
    """Executions share a gVisor sandbox one after another (a fresh process each, as in the pod),
    and nothing of one reaches the next: interpreter state, files, unlistable directories, IPC.
    With interpreters started ahead (pool_size 1) as well."""
    with Executor(backend="runsc", pool_size=pool_size, preload=(), **LIMITS) as ex:
        workdir = ex._backend.workdir
        cgroup_parent = ex._backend.cgroup_parent
        first = ex.execute(["import builtins, os, ctypes\nbuiltins.leak = 1\nopen('/tmp/leak', 'w').write('x')\n"
                            "os.mkdir('/tmp/locked', 0)\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                            "print('set', libc.shmget(4242, 4096, 0o1666), ctypes.get_errno())"])
        second = ex.execute(["import os, builtins\nprint(hasattr(builtins, 'leak'), os.listdir('/tmp'))"])
        assert (first.stdout, second.stdout) == ("set -1 1\n", "False []\n")  # shmget: EPERM
        assert ex.drain(60)
        if pool_size == 0:  # nothing starts ahead: the probe and both executions ran in one sandbox
            (sandbox,) = ex._backend._idle
            assert sandbox.uses == 3
    assert not workdir.exists()
    assert not list(Path("/sys/fs/cgroup").glob("*" + cgroup_parent))


def test_one_runner_serves_a_sandbox_and_its_end_marker_cannot_be_forged(runsc):
    """A runsc sandbox runs one serving runner, which forks a fresh supervisor per execution: stdout
    stays open between executions, so each one's output ends at a marker drawn after its worker
    died. Output that imitates a marker, never ends its line, or ends in a clean CPU-limit kill
    comes back whole, and the sandbox and its runner serve the next execution."""
    assert runsc.drain(60)
    backend = runsc._backend
    with backend._lock:  # keep one idle sandbox: the executions below all take it
        extra, backend._idle[:] = backend._idle[:-1], backend._idle[-1:]
    for other in extra:
        backend._stop_sandbox(other)
    (sandbox,) = backend._idle
    runner_pid, uses = sandbox.runner.pid, sandbox.uses
    fake = "\\x00" + "0" * 32 + "\\n"
    results = [runsc.execute([cell]) for cell in (
        f"import sys\nsys.stdout.write('a{fake}b'); sys.stdout.flush()\nprint('{fake}', end='')",
        "print('no newline', end='')",
        "x = 0\nwhile True:\n    x += 1",
        "import os\nprint(os.getppid() != 1, sorted(os.listdir('/tmp')))",
    )]
    assert [(r.stdout, r.error is None, r.timed_out) for r in results] == [
        ("a\0" + "0" * 32 + "\nb\0" + "0" * 32 + "\n", True, False),
        ("no newline", True, False),
        ("", False, True),
        ("True []\n", True, False),
    ]
    assert runsc.drain(60)
    assert backend._idle == [sandbox] and sandbox.uses == uses + 4
    assert sandbox.runner.pid == runner_pid and sandbox.runner.poll() is None


def test_a_served_sandbox_keeps_the_heavy_modules_its_code_keeps_importing(runsc):
    """Once cells have imported sympy twice (and in at least 1 of 16 executions), later executions in that
    sandbox fork with sympy loaded (the serving runner imported it itself: under ptrace a sympy cell took
    ~1.1 s per execution, ~0.12 s so); before, nothing heavy is loaded. The check cells do not name the
    module, so nothing is imported for them."""
    assert runsc.drain(60)
    backend = runsc._backend
    with backend._lock:  # a fresh sandbox: no execution in it has imported anything yet
        idle, backend._idle[:] = backend._idle[:], []
    for other in idle:
        backend._stop_sandbox(other)
    look = "import sys\nprint(sorted(m for m in ('sym' + 'py', 'num' + 'py') if m in sys.modules))"
    assert runsc.execute([look]).stdout == "[]\n"
    for expected in ("[]\n", "['sympy']\n"):  # needed once: not yet; twice (2 of 3 executions): kept
        assert runsc.execute(["import sympy\nprint(sympy.sqrt(8))"]).stdout == "2*sqrt(2)\n"
        assert runsc.drain(60)
        assert len(backend._idle) == 1
        assert runsc.execute([look]).stdout == expected
    r = runsc.execute(["import sympy\nsympy.leak = 1\nprint(sympy.sqrt(2) ** 2)"])
    assert (r.stdout, r.error) == ("2\n", None)
    assert runsc.execute(["import sys\nprint(hasattr(sys.modules['sym' + 'py'], 'leak'))"]).stdout == "False\n"


def test_a_sandbox_is_reused_only_after_a_clean_execution(runsc):
    """An execution the host had to stop (past the wall clock, flooding) ends its whole sandbox:
    nothing it left running can meet the next execution. (Past the CPU limit the runner itself sees
    its worker killed, reports and sweeps: that is a clean end.)"""
    assert runsc.drain(60)
    backend = runsc._backend
    for cell, check in (("import time\ntime.sleep(60)", lambda r: r.timed_out), (OUTPUT_FLOOD, lambda r: "Output" in (r.error or ""))):
        assert_still_works(runsc)
        assert runsc.drain(60)
        with backend._lock:  # keep one idle sandbox: the next execution takes it
            extra, backend._idle[:] = backend._idle[:-1], backend._idle[-1:]
        for other in extra:
            backend._stop_sandbox(other)
        before = {w.id: w for w in backend._idle}
        assert len(before) == 1
        assert check(runsc.execute([cell]))
        assert runsc.drain(60)
        (sandbox,) = before.values()
        assert sandbox.proc.poll() is not None and sandbox.id not in {w.id for w in backend._idle}
        assert not list(backend.state.glob(f"*{sandbox.id}*")) and not sandbox.bundle.exists()
        assert_still_works(runsc)


# ----------------------------------------------------------------------------------- bubblewrap


def test_bwrap_contains(bwrap, host_listener):
    assert bwrap.backend == "bwrap"
    r = bwrap.execute(["x = 20", "import numpy, sympy\nprint(x + 1, sympy.sqrt(8))"])
    assert (r.stdout, r.error) == ("21 2*sqrt(2)\n", None)
    assert bwrap.execute([IDENTITY_CELL]).stdout == "65534 65534 ['0000000000000000']\n"
    r = bwrap.execute([network_cell(host_listener)])
    assert r.stdout.count("blocked") == 3 and "CONNECTED" not in r.stdout, r.stdout
    r = bwrap.execute([HOST_FILES_CELL])
    assert r.stdout.count("denied") == 8, r.stdout
    r = bwrap.execute([WRITE_CELL])
    assert r.stdout.count("denied") == 4 and r.stdout.endswith("scratch ok\n"), r.stdout


def test_bwrap_stops_hostile_code(bwrap):
    for cell in (FORK_BOMB, MEMORY_BOMB, OUTPUT_FLOOD):
        r = bwrap.execute([cell])
        assert r.error, (cell, r)
        assert_still_works(bwrap)
    r = bwrap.execute([INFINITE_LOOP])
    assert r.timed_out, r
    assert_still_works(bwrap)


def test_no_silent_downgrade_to_a_weaker_backend():
    """auto never falls back to bwrap, and bwrap itself needs the explicit allow_weak flag."""
    with pytest.raises(SandboxUnavailable, match="never falls back to a weaker backend"):
        Executor(runsc_path="/nonexistent/runsc", **LIMITS)
    with pytest.raises(SandboxUnavailable, match="weaker than gVisor"):
        Executor(backend="bwrap", **LIMITS)
    # outside gVisor (and as root) the pod backend refuses to start rather than run unconfined
    with pytest.raises(SandboxUnavailable, match="pod backend"):
        Executor(backend="pod", **LIMITS)


def test_backend_is_named_in_every_result(runsc, bwrap):
    assert runsc.execute(["print(1)"]).backend == "runsc" and runsc.execute([]).backend == "runsc"
    assert runsc.info() == {"backend": "runsc", "strength": "gvisor", "production": True, "pool_size": 0,
                            "max_parallel": 0}
    assert bwrap.execute(["print(1)"]).backend == "bwrap"
    assert bwrap.info()["production"] is False and bwrap.info()["strength"] == "namespaces"


def test_no_backend_is_a_clear_error():
    tmp = tempfile.gettempdir()
    before = {p for p in os.listdir(tmp) if p.startswith("alphamath-runsc-")}
    with pytest.raises(SandboxUnavailable, match="no sandbox backend"):
        Executor(runsc_path="/nonexistent/runsc", bwrap_path="/nonexistent/bwrap", **LIMITS)
    with pytest.raises(SandboxUnavailable, match="python3"):
        Executor(python="/nonexistent/python3", **LIMITS)
    after = {p for p in os.listdir(tmp) if p.startswith("alphamath-runsc-")}
    assert after <= before  # a failed backend removes its bundle/state directory


def test_importing_sympy_is_not_charged_to_the_code():
    """sympy takes 1-8 s to import under gVisor ptrace (by host); a 1 s limit must still cover the cell."""
    with Executor(backend="runsc", **{**LIMITS, "cpu_s": 1.0, "timeout_s": 1.0}) as ex:
        r = ex.execute(["import sympy\nprint(sympy.Rational(1, 3) + sympy.Rational(1, 6))"])
        assert (r.stdout, r.error, r.timed_out) == ("1/2\n", None, False)
        assert ex.execute(["while True: pass"]).timed_out  # the limit still holds for the code itself


def test_slow_or_failing_teardown_never_fails_an_execution():
    """Teardown runs in the background: a hung `runsc delete` neither delays nor fails execute(),
    and every outcome is counted for the metric."""
    seen = []
    with Executor(backend="runsc", on_teardown=lambda *a: seen.append(a), **LIMITS) as ex:
        real_destroy = ex._backend.destroy
        calls, hung = [], threading.Event()

        def slow_then_broken(box):
            calls.append(box.id)
            nth, start = len(calls), time.monotonic()
            real_destroy(box)
            hung.wait(60)  # hangs until both executions have returned
            threading.Event().wait(max(0.0, 2.5 - (time.monotonic() - start)))  # over TEARDOWN_SLOW_S
            if nth == 2:
                raise subprocess.TimeoutExpired("runsc delete", 10)

        ex._backend.destroy = slow_then_broken
        for _ in range(2):
            r = ex.execute(["print('fine')"])
            assert (r.stdout, r.error) == ("fine\n", None)
        assert ex.teardowns == {"ok": 0, "slow": 0, "failed": 0}  # both returned, teardowns still hung
        hung.set()
        assert ex.drain(60)
        assert ex.teardowns == {"ok": 0, "slow": 1, "failed": 1}
        assert sorted((b, o) for b, o, _ in seen) == [("runsc", "failed"), ("runsc", "slow")]


def test_an_error_is_still_named_when_the_code_broke_traceback(runsc):
    """The worker imports traceback only to format an error; code that broke the import system
    still gets its error reported (its type's name), not a silent success."""
    r = runsc.execute(["import builtins\ndef no(*a, **k):\n    raise ImportError('no imports')\n"
                       "builtins.__import__ = no\nraise KeyError('k')"])
    assert r.error == "KeyError" and r.stdout == ""


def test_a_run_that_ended_before_a_passed_deadline_is_read_not_timed_out():
    """The executor's host-side deadline counts wall time this process may not have run (paused
    with SIGSTOP, or starved): output already written when it looks is the run's, not a timeout."""
    from alphamath.sandbox.executor import _Box, _read_until, _wait_line

    out_r, out_w = socket.socketpair()
    err_r, err_w = socket.socketpair()
    out_w.sendall(b"42\n")
    err_w.sendall(b'{"exit": 0}\n')
    out_w.close()
    err_w.close()
    box = _Box(id="b", proc=None, bundle=None, status=bytearray(), io=(None, out_r, err_r))
    assert _read_until(box, time.monotonic() - 5.0, want_ready=False, stdout_cap=1024) == (b"42\n", "eof")
    assert bytes(box.status) == b'{"exit": 0}\n'

    idle_r, idle_w = socket.socketpair()  # a run still going when its deadline passed: a timeout
    box = _Box(id="c", proc=None, bundle=None, status=bytearray(), io=(None, idle_r, idle_w))
    assert _read_until(box, time.monotonic() - 5.0, want_ready=False, stdout_cap=1024) == (b"", "timeout")

    a, b = socket.socketpair()
    b.sendall(b"up\n")
    assert _wait_line(a, b"up\n", time.monotonic() - 5.0)  # the line was there: not a timeout
    assert not _wait_line(a, b"READY\n", time.monotonic() - 5.0)  # nothing more came
    for s in (out_r, err_r, idle_r, idle_w, a, b):
        s.close()
