"""The code interpreter of the paper's action space: runs a solution path's code cells in a sandbox.

`Executor.execute(cells)` implements `alphamath.interfaces.Sandbox`: each call gets ONE fresh
sandboxed interpreter process that replays the path's earlier cells (rebuilding state, output discarded)
and returns what the last cell printed. Nothing is ever exec'd in this process. In the gVisor
backends that process is a fork of a serving runner (runner.py's `_serve`) that never reads a
request nor runs model code: the same fresh state as a new interpreter, without Python's start
(under gVisor's ptrace platform, `print(6 * 7)` took 159 ms of the machine's CPU as a new
`runsc exec` of Python, 54 ms as a fork).

Backends (`Executor.backend`), by strength:
  * "runsc" (gVisor is the kernel boundary): `runsc run` of a generated OCI bundle (ptrace
    platform, no network): read-only root built from the host's /usr, size-limited tmpfs /tmp,
    uid/gid 65534, no capabilities, noNewPrivileges, rlimits, cgroup memory/pids limits. For hosts.
    A sandbox serves executions one at a time, each a fresh process, as a pod does; it is reused
    only after an execution that ended cleanly and left /tmp empty.
  * "pod" (gVisor is the kernel boundary): for a service that itself runs inside a gVisor pod
    (RuntimeClass gvisor, no capabilities), where runsc cannot be started again. Each execution is
    a fresh process with an empty environment, its own pipes only, a private scratch directory
    removed afterwards, and the runner's rlimits and seccomp filter, as the pod's non-root uid.
    It refuses to start outside gVisor or as root.
  * "bwrap" (weaker: the host kernel is exposed to the model's code): bubblewrap namespaces, uid
    65534, rlimits by prlimit. Used only when named AND `allow_weak=True`.
`auto` chooses among the equally strong ones only (pod inside gVisor, else runsc); it never falls
back to a weaker backend. In every backend the runner (runner.py) runs the model's code in a forked
worker that cannot reach the result channel (see there).

Latency: an interpreter is single-use (no state can leak between requests), but it can be started
ahead of time. With `pool_size > 0` a background thread keeps that many interpreters started, waiting
for their one request on stdin (`preload` can import modules ahead; by default none, see there);
runsc starts whole sandboxes ahead, and the pod, whose one serving runner is already waiting,
keeps no pool. Tearing a used sandbox down
happens in the background (bounded by timeouts, counted by `on_teardown`): a slow teardown never
delays or fails an execution.
"""
from __future__ import annotations

import functools
import json
import logging
import marshal
import os
import queue
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from alphamath.interfaces import ExecResult

log = logging.getLogger(__name__)

# Heavy trusted packages the runner imports (when a cell names them) before the wall clock and the
# CPU limit of the model's code start: importing sympy takes 1-8 s under gVisor ptrace, by host.
LAZY_IMPORTS = ("numpy", "sympy")

RUNNER_SOURCE = (Path(__file__).with_name("runner.py")).read_text()
SANDBOX_UID = 65534
# Equally strong: gVisor is the kernel boundary. `auto` picks among these only, never a weak one.
STRONG_BACKENDS = ("pod", "runsc")
WEAK_BACKENDS = ("bwrap",)
BACKENDS = STRONG_BACKENDS + WEAK_BACKENDS
DEFAULT_PYTHON = "/usr/bin/python3"
# Host-side pids/memory the gVisor sentry and gofer need on top of what the model's code gets
# (the cgroup covers the whole sandbox, not only the guest's processes).
RUNSC_PIDS_OVERHEAD = 128
RUNSC_MEMORY_OVERHEAD = 384 << 20
STATUS_CAP = 64 << 10
READY = b"ready\n"
# runsc: a sandbox serves executions one after another, each a fresh fork of its serving runner
# (booting a sandbox under ptrace costs ~6x a `runsc exec` of Python, which costs ~3x a fork); at
# most WARM_IDLE wait idle, each serves at most WARM_USES executions. Its init runs as INIT_UID, which no execution runs as, and only waits.
WARM_IDLE = 8
WARM_USES = 256
INIT_UID = 65533
INIT_SOURCE = "import os, sys\nos.write(1, b'up\\n')\nsys.stdin.buffer.read()"
# A teardown slower than this is counted as "slow"; each of its steps is bounded by TEARDOWN_STEP_S.
TEARDOWN_SLOW_S = 2.0
TEARDOWN_STEP_S = 10.0


class SandboxUnavailable(RuntimeError):
    """No sandbox backend can run code on this machine."""


class SandboxStartError(RuntimeError):
    """A sandbox failed to boot (as opposed to the model's code failing inside it)."""


@dataclass(frozen=True)
class Limits:
    """Per-execution resource limits; `memory_bytes` is what the model's code may allocate."""

    memory_bytes: int = 256 << 20
    pids: int = 32
    cpu_s: float = 5.0
    timeout_s: float = 5.0
    max_output_bytes: int = 1024
    max_code_bytes: int = 64 << 10
    tmpfs_bytes: int = 16 << 20
    # Output beyond this (the kept part is max_output_bytes) means a flood: the sandbox is killed.
    output_hard_cap: int = 64 << 10
    startup_timeout_s: float = 30.0


@dataclass
class _Box:
    """One started, single-use interpreter (the runner) waiting for its request on stdin."""

    id: str
    proc: subprocess.Popen
    bundle: Path | None
    status: bytearray
    finished: bool = False
    worker_pid: int | None = None
    io: tuple = ()  # our ends of its stdin, stdout, stderr (the status channel)
    sandbox: "_Warm | None" = None  # runsc: the gVisor sandbox this execution runs in
    reused: bool = False  # runsc: its sandbox went back to the idle set after a clean execution
    served: bool = False  # a fork of a serving runner, already waiting for its request (no boot handshake)
    cwd: str | None = None  # pod: the directory the execution's supervisor moves into
    supervisor_pid: int | None = None  # served: the fork of the runner that supervises the worker


@dataclass
class _Warm:
    """One long-lived gVisor sandbox (runsc): it runs one execution at a time, each a fresh runner
    process started by `runsc exec`, and is kept only while every execution in it ended cleanly."""

    id: str
    proc: subprocess.Popen  # `runsc run` of its idle init; the init's stdin is its lifeline
    bundle: Path
    io: tuple
    uses: int = 0
    runner: subprocess.Popen | None = None  # `runsc exec` of the serving runner (runner.py's _serve)
    runner_io: tuple = ()  # our ends of its stdin (requests), stdout (output), stderr (status)


def ro_root_layout() -> tuple[list[tuple[str, str]], list[str]]:
    """The host paths a Python under /usr needs: (symlinks to replicate, dirs/files to bind ro)."""
    links, binds = [], ["/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / name
        if host.is_symlink():
            links.append((name, os.readlink(host)))
        elif host.is_dir():
            binds.append(str(host))
    # numpy's BLAS is found through Debian's alternatives symlinks and the loader cache.
    for path in ("/etc/alternatives", "/etc/ld.so.cache"):
        if os.path.exists(path):
            binds.append(path)
    return links, binds


PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 4, 36


def _prctl(option: int, value: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}, {value}) failed")


def running_in_gvisor() -> bool:
    """True inside a gVisor sandbox: its kernel log (readable there without privileges) says so."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(4096)
        n = libc.klogctl(3, buf, len(buf))  # SYSLOG_ACTION_READ_ALL
    except (OSError, AttributeError):
        return False
    return n > 0 and b"Starting gVisor" in buf.raw[:n]


class _Backend:
    name = "?"
    strength = "?"  # "gvisor" (the kernel boundary is gVisor) or "namespaces" (the host kernel)
    max_parallel: int | None = None  # executions that may run at once (None: no limit of its own)
    sweep: tuple[str, ...] = ()  # what the runner empties after its worker is gone (a reused sandbox)
    serve = False  # one runner serves many executions, a fork each (runner.py's _serve)
    poolable = True  # executions can be started ahead (Executor's pool_size)

    def __init__(self, limits: Limits, python: str, preload: Sequence[str]):
        self.limits = limits
        self.python = python
        self.runner_args = marshal.dumps(  # runner.py reads it with the builtin marshal (no imports)
            {
                "cpu_s": limits.cpu_s,
                "memory_bytes": limits.memory_bytes,
                "pids": limits.pids,
                "file_bytes": limits.tmpfs_bytes,
                "preload": list(preload),
                "lazy": list(LAZY_IMPORTS),
                "max_request_bytes": 4 * limits.max_code_bytes + 4096,
                "sweep": list(self.sweep),
                "serve": self.serve,
            },
            4,
        ).hex()
        self.argv_tail = [python, "-I", "-B", "-c", RUNNER_SOURCE, self.runner_args]
        self.env = {
            "PATH": "/usr/bin:/bin",
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MPLCONFIGDIR": "/tmp",
        }

    def launch(self) -> _Box:
        raise NotImplementedError

    def destroy(self, box: _Box) -> None:
        raise NotImplementedError

    def started(self, box: _Box) -> None:
        """Called once the box's worker runs (its second "ready")."""

    def release(self, box: _Box) -> None:
        """Called when an execution is over, before its result is returned: the quick part of the
        teardown that the next execution depends on (the rest runs in the background)."""

    def close(self) -> None:
        pass

    @staticmethod
    def _popen(argv: list[str], **kw) -> tuple[subprocess.Popen, tuple[socket.socket, ...]]:
        """Start argv with socketpairs as stdin/stdout/stderr; returns (proc, our three ends).

        Sockets, not pipes: another process of the same uid inside gVisor can reopen a pipe
        through /proc/<pid>/fd/N and write into it (a forged result), but not a socket (ENXIO)."""
        pairs = [socket.socketpair() for _ in range(3)]
        try:
            proc = subprocess.Popen(
                argv,
                stdin=pairs[0][1].fileno(),
                stdout=pairs[1][1].fileno(),
                stderr=pairs[2][1].fileno(),
                close_fds=True,
                start_new_session=True,
                **kw,
            )
        except BaseException:
            for a, b in pairs:
                a.close()
                b.close()
            raise
        for _, theirs in pairs:
            theirs.close()
        return proc, tuple(ours for ours, _ in pairs)

    @staticmethod
    def _reap(box: _Box, grace_s: float = 2.0) -> None:
        for stream in box.io:
            try:
                stream.close()
            except OSError:
                pass
        try:
            box.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(box.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            box.proc.wait()


class RunscBackend(_Backend):
    """gVisor: `runsc run` of an OCI bundle over a shared read-only rootfs, reused execution by execution.

    A sandbox runs one runner (`runsc exec`, once) that serves its executions one at a time: for
    each it forks a fresh supervisor, which reads the request and forks the worker (runner.py's
    `_serve`); the serving runner itself never reads a request nor runs model code, so each
    execution starts from the same state, as a fresh process would. The supervisor empties /tmp
    (the only writable place) after its worker is gone, and the worker can neither fork nor use
    SysV/POSIX IPC, so an execution leaves nothing behind. A sandbox whose execution did not end
    cleanly is destroyed.
    """

    name = "runsc"
    strength = "gvisor"
    sweep = ("/tmp",)
    serve = True

    def __init__(self, limits: Limits, python: str, preload: Sequence[str], runsc: str = "runsc"):
        super().__init__(limits, python, preload)
        self.runsc = shutil.which(runsc) or runsc
        if not os.access(self.runsc, os.X_OK):
            raise SandboxUnavailable(f"runsc not found ({runsc})")
        self.workdir = Path(tempfile.mkdtemp(prefix="alphamath-runsc-"))
        os.chmod(self.workdir, 0o711)
        self.state = self.workdir / "state"
        self.state.mkdir(mode=0o700)
        self.rootfs = self.workdir / "rootfs"
        self.cgroup_parent = f"/alphamath-sandbox-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        links, binds = ro_root_layout()
        self._build_rootfs(links, binds)
        self._idle: list[_Warm] = []
        self._lock = threading.Lock()
        self._closed = False
        self.mounts = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/tmp",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", "noexec", f"size={limits.tmpfs_bytes}", "mode=1777"],
            },
        ] + [
            {
                "destination": path,
                "type": "bind",
                "source": path,
                "options": ["rbind" if os.path.isdir(path) else "bind", "ro", "nosuid", "nodev"],
            }
            for path in binds
        ]
        self.process_json = self.workdir / "process.json"  # the serving runner each sandbox `runsc exec`s
        self.process_json.write_text(json.dumps(self._spec("exec")["process"]))

    def _build_rootfs(self, links, binds) -> None:
        """Mount points only: the root itself is read-only and holds no host data."""
        self.rootfs.mkdir(mode=0o755)
        for d in ("proc", "tmp", "dev", "sys", "etc"):
            (self.rootfs / d).mkdir(mode=0o755, exist_ok=True)
        for name, target in links:
            (self.rootfs / name).symlink_to(target)
        for path in binds:
            dest = self.rootfs / path.lstrip("/")
            if os.path.isdir(path):
                dest.mkdir(parents=True, exist_ok=True)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.touch()

    def _spec(self, cid: str) -> dict:
        lim = self.limits
        cpu = max(1, int(lim.cpu_s + 0.999))
        # Outer rlimits are loose enough for the preload; the runner tightens them before user code.
        rlimits = [
            ("RLIMIT_CPU", cpu + 30, cpu + 31),
            ("RLIMIT_NOFILE", 256, 256),
            ("RLIMIT_FSIZE", lim.tmpfs_bytes, lim.tmpfs_bytes),
            ("RLIMIT_CORE", 0, 0),
            ("RLIMIT_NPROC", lim.pids, lim.pids),
        ]
        return {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": SANDBOX_UID, "gid": SANDBOX_UID, "additionalGids": []},
                "args": self.argv_tail,
                "env": [f"{k}={v}" for k, v in self.env.items()],
                "cwd": "/tmp",
                "capabilities": {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")},
                "rlimits": [{"type": t, "soft": s, "hard": h} for t, s, h in rlimits],
                "noNewPrivileges": True,
            },
            "root": {"path": str(self.rootfs), "readonly": True},
            "hostname": "sandbox",
            "mounts": self.mounts,
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
                "cgroupsPath": f"{self.cgroup_parent}/{cid}",
                "resources": {
                    "memory": {
                        "limit": lim.memory_bytes + RUNSC_MEMORY_OVERHEAD,
                        "swap": lim.memory_bytes + RUNSC_MEMORY_OVERHEAD,
                    },
                    "pids": {"limit": lim.pids + RUNSC_PIDS_OVERHEAD},
                },
                "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
                "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"],
            },
        }

    def _cmd(self, *args: str) -> list[str]:
        return [self.runsc, "--root", str(self.state), "--platform=ptrace", "--network=none", *args]

    def _start_sandbox(self) -> _Warm:
        """`runsc run` a sandbox whose init only waits on stdin (a socket: no process inside can
        reopen it), as INIT_UID, so no execution's uid can signal or inspect it."""
        cid = f"am-{uuid.uuid4().hex[:20]}"
        bundle = self.workdir / cid
        bundle.mkdir(mode=0o700)
        spec = self._spec(cid)
        spec["process"]["user"] = {"uid": INIT_UID, "gid": INIT_UID, "additionalGids": []}
        spec["process"]["args"] = [self.python, "-I", "-S", "-c", INIT_SOURCE]
        (bundle / "config.json").write_text(json.dumps(spec))
        proc, io = self._popen(self._cmd("run", "--bundle", str(bundle), cid))
        sandbox = _Warm(cid, proc, bundle, io)
        deadline = time.monotonic() + self.limits.startup_timeout_s
        try:
            if not _wait_line(io[1], b"up\n", deadline):
                raise SandboxStartError(f"runsc sandbox {cid} did not start")
            sandbox.runner, sandbox.runner_io = self._popen(
                self._cmd("exec", "--process", str(self.process_json), cid))
            if not _wait_line(sandbox.runner_io[2], READY, deadline):
                raise SandboxStartError(f"the runner of runsc sandbox {cid} did not start")
        except BaseException:
            self._stop_sandbox(sandbox)
            raise
        return sandbox

    def launch(self) -> _Box:
        with self._lock:
            sandbox = self._idle.pop() if self._idle else None
        if sandbox is None or sandbox.proc.poll() is not None or sandbox.runner.poll() is not None:
            if sandbox is not None:
                self._stop_sandbox(sandbox)
            sandbox = self._start_sandbox()
        sandbox.uses += 1
        return _Box(f"{sandbox.id}.{sandbox.uses}", sandbox.runner, None, bytearray(), io=sandbox.runner_io,
                    sandbox=sandbox, served=True)

    def release(self, box: _Box) -> None:
        """A sandbox goes back to the idle set only after a clean execution: the supervisor reported
        a status, its worker is gone (the supervisor waits for it) and it swept /tmp. Anything else
        (a timeout, a flood, a killed runner) ends the whole sandbox in destroy()."""
        sandbox = box.sandbox
        if sandbox is None or not _ended_cleanly(box) or sandbox.uses >= WARM_USES:
            return
        with self._lock:
            if (len(self._idle) < WARM_IDLE and not self._closed and sandbox.proc.poll() is None
                    and sandbox.runner.poll() is None):
                self._idle.append(sandbox)
                box.reused = True

    def destroy(self, box: _Box) -> None:
        if box.sandbox is not None and not box.reused:
            self._stop_sandbox(box.sandbox)

    def _stop_sandbox(self, sandbox: _Warm) -> None:
        """End a sandbox and everything in it; remove its state, bundle and cgroup."""
        for stream in (*sandbox.runner_io, *sandbox.io):  # the init's stdin closes: it exits, the sandbox with it
            try:
                stream.close()
            except OSError:
                pass
        try:
            sandbox.proc.wait(2.0)
        except subprocess.TimeoutExpired:
            for args in (("kill", sandbox.id, "KILL"), ("delete", "--force", sandbox.id)):
                subprocess.run(self._cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=TEARDOWN_STEP_S)
            try:
                sandbox.proc.wait(TEARDOWN_STEP_S)
            except subprocess.TimeoutExpired:
                os.killpg(sandbox.proc.pid, signal.SIGKILL)
                sandbox.proc.wait()
        if sandbox.runner is not None:  # the `runsc exec` client ends with the sandbox
            try:
                sandbox.runner.wait(TEARDOWN_STEP_S)
            except subprocess.TimeoutExpired:
                os.killpg(sandbox.runner.pid, signal.SIGKILL)
                sandbox.runner.wait()
        if list(self.state.glob(f"*{sandbox.id}*")):
            subprocess.run(self._cmd("delete", "--force", sandbox.id), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=TEARDOWN_STEP_S)
        shutil.rmtree(sandbox.bundle, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            self._closed, idle, self._idle = True, self._idle, []
        for sandbox in idle:
            try:
                self._stop_sandbox(sandbox)
            except Exception as exc:  # noqa: BLE001 - keep closing the others
                log.error("could not stop runsc sandbox %s: %s", sandbox.id, exc)
        shutil.rmtree(self.workdir, ignore_errors=True)
        # runsc removes each container's cgroup; the (empty) per-executor parent is ours to remove.
        for parent in Path("/sys/fs/cgroup").glob("*" + self.cgroup_parent):
            try:
                parent.rmdir()
            except OSError:
                pass
        try:
            Path("/sys/fs/cgroup" + self.cgroup_parent).rmdir()  # cgroup v2 (unified) layout
        except OSError:
            pass


class BwrapBackend(_Backend):
    """bubblewrap: unprivileged namespaces, run as uid 65534 on the host, rlimits via prlimit."""

    name = "bwrap"
    strength = "namespaces"

    def __init__(self, limits: Limits, python: str, preload: Sequence[str], bwrap: str = "bwrap"):
        super().__init__(limits, python, preload)
        self.bwrap = shutil.which(bwrap)
        self.prlimit = shutil.which("prlimit")
        if not self.bwrap or not self.prlimit:
            raise SandboxUnavailable(f"bwrap ({bwrap}) or prlimit not found")
        links, binds = ro_root_layout()
        argv = [
            "--unshare-all",
            "--die-with-parent",
            "--new-session",
            "--uid", str(SANDBOX_UID),
            "--gid", str(SANDBOX_UID),
            "--hostname", "sandbox",
            "--proc", "/proc",
            "--dev", "/dev",
            "--size", str(limits.tmpfs_bytes),
            "--tmpfs", "/tmp",
            "--chdir", "/tmp",
            "--clearenv",
        ]  # fmt: skip
        for path in binds:
            argv += ["--ro-bind", path, path]
        for name, target in links:
            argv += ["--symlink", target, "/" + name]
        argv += ["--remount-ro", "/"]  # last: the root tmpfs is read-only once populated
        for k, v in self.env.items():
            argv += ["--setenv", k, v]
        cpu = max(1, int(limits.cpu_s + 0.999))
        # RLIMIT_AS also bounds the interpreter + preloads here; the runner tightens it further.
        outer_as = limits.memory_bytes + RUNSC_MEMORY_OVERHEAD
        self.argv = [
            self.prlimit,
            f"--cpu={cpu + 30}:{cpu + 31}",
            f"--as={outer_as}",
            # Counted per uid across the host, gVisor's own processes (uid 65534 too) included;
            # the runner's worker gets `pids` and cannot fork at all (seccomp).
            f"--nproc={limits.pids + 128}",
            f"--fsize={limits.tmpfs_bytes}",
            "--nofile=256",
            "--core=0",
            "--",
            self.bwrap,
            *argv,
            "--",
            *self.argv_tail,
        ]
        self.as_root = os.geteuid() == 0
        self.setpriv = shutil.which("setpriv")
        if self.as_root and not self.setpriv:
            raise SandboxUnavailable("setpriv (util-linux) not found: needed to drop root before bwrap")

    def launch(self) -> _Box:
        argv = self.argv
        if self.as_root:
            # Drop to nobody before bwrap so the sandbox has no host privileges at all and
            # RLIMIT_NPROC counts (root is exempt from it). setpriv does it after exec: Popen's own
            # user=/group= would fork without vfork and run the parent's atfork handlers (gRPC's
            # break the child in a process that serves gRPC).
            argv = [self.setpriv, f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups", "--",
                    *argv]
        proc, io = self._popen(argv, cwd="/", env=self.env)  # bwrap's own /proc/1/environ is visible inside
        return _Box(f"bw-{uuid.uuid4().hex[:12]}", proc, None, bytearray(), io=io)

    def destroy(self, box: _Box) -> None:
        if box.proc.poll() is None:
            try:
                os.killpg(box.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                box.proc.kill()
        self._reap(box)


class PodBackend(_Backend):
    """Inside a gVisor pod: a fresh process per execution, forked by one serving runner, as the pod's
    non-root uid.

    gVisor (the pod's RuntimeClass) is the kernel boundary. Within the pod the runner's worker
    cannot create processes, signal/ptrace/prlimit anything but itself, open sockets or change
    file modes (seccomp), and every process of ours is non-dumpable, so the model's code cannot
    reach the service or another execution through /proc. Scratch directories have unguessable
    names in a root it cannot list, and once a box has started no path leads into its directory
    (the box works relative to its cwd); anything left outside is swept after each execution.

    The runner (runner.py's `_serve`: its own process group, an empty environment) forks a fresh
    supervisor per execution, which moves into the box's directory and forks the worker; the runner
    itself never reads a request nor runs model code. After an execution that did not end cleanly
    (a timeout, a flood, no status) the runner's whole process group is killed and the next
    execution starts a new one, as before every execution in the past (~100 ms of CPU under gVisor).

    Known limits (all inside the pod, whose kernel boundary is gVisor): the model's code can write
    lines into the service's own stdout/stderr (gVisor lets the same uid reopen the service's host
    stdio through /proc/1/fd), so the pod log is not trustworthy evidence; it can read the
    service's command line and memory map; absolute paths into its own scratch do not open
    (relative ones do), so `tempfile` falls back to the swept /tmp.
    """

    name = "pod"
    strength = "gvisor"
    # Executions of one pod share a uid, and this gVisor lets a process of that uid reopen another's
    # open files through /proc/<pid>/fd/N: so model code never runs twice at once in a pod (the
    # next starts after the previous one's processes and files are gone). Scale with replicas.
    max_parallel = 1
    serve = True
    poolable = False  # one runner, already started, serves every execution

    def __init__(self, limits: Limits, python: str, preload: Sequence[str], scratch_dir: str | None = None):
        super().__init__(limits, python, preload)
        if os.geteuid() == 0:
            raise SandboxUnavailable("the pod backend runs model code as the pod's own non-root uid; "
                                     "refusing to run it as root")
        if not running_in_gvisor():
            raise SandboxUnavailable("the pod backend needs gVisor as its kernel boundary (RuntimeClass gvisor); "
                                     "this process is not running under gVisor")
        # This service process: non-dumpable (model code of the same uid cannot ptrace it or open
        # its /proc memory), and the reaper of orphaned workers (they come back to us, not pid 1).
        _prctl(PR_SET_DUMPABLE, 0)
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        base = scratch_dir or os.environ.get("ALPHAMATH_SANDBOX_SCRATCH_DIR") or tempfile.gettempdir()
        for stale in Path(base).glob("alphamath-scratch-*"):  # a previous life of this container's
            _remove(stale)
        self.scratch = Path(tempfile.mkdtemp(prefix="alphamath-scratch-", dir=base))
        os.chmod(self.scratch, 0o711)  # traversable, not listable: a box cannot find the others
        # Other places the pod lets us (and so the model's code) write: what appears there is swept.
        self._shared = {d: set(os.listdir(d)) | {self.scratch.name} for d in {base, "/dev/shm"}
                        if os.path.isdir(d) and os.access(d, os.W_OK)}
        self._live: set[str] = set()
        self._lock = threading.Lock()
        self.argv = list(self.argv_tail)
        self._runner: _Box | None = None  # the serving runner: its process and our ends of its stdio

    def launch(self) -> _Box:
        runner = self._runner
        if runner is None or runner.proc.poll() is not None:
            self._stop_runner()
            # env={}: nothing of the service's environment; the runner sets its own few knobs.
            proc, io = self._popen(self.argv, cwd=str(self.scratch), env={})
            runner = _Box("runner", proc, None, bytearray(), io=io)
            if not _wait_line(io[2], READY, time.monotonic() + self.limits.startup_timeout_s):
                self._reap(runner, grace_s=0)
                raise SandboxStartError("the pod's runner did not start")
            self._runner = runner
        name = secrets.token_hex(16)
        box_dir = self.scratch / name / "work"
        with self._lock:
            self._live.add(name)
            box_dir.parent.mkdir(mode=0o700)
            box_dir.mkdir(mode=0o700)
        return _Box(name, runner.proc, box_dir.parent, bytearray(), io=runner.io, served=True, cwd=str(box_dir))

    def started(self, box: _Box) -> None:
        # The box's supervisor has moved into its directory: from now on no path leads into it, so
        # another execution (same uid) that learns the path from /proc/<pid>/fd cannot open its files.
        os.chmod(Path(box.cwd).parent, 0)

    def release(self, box: _Box) -> None:
        # Its processes end and its scratch space is freed before the next execution can start. After
        # a clean execution the worker is gone (its supervisor waited for it and reported); otherwise
        # the runner's process group goes: the worker can neither leave the group (setsid/setpgid are
        # denied) nor create processes, so that ends everything the execution started.
        if _ended_cleanly(box):
            box.reused = True
        else:
            self._stop_runner()
        with self._lock:
            self._live.discard(box.id)
            self._sweep()

    def _stop_runner(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            try:
                os.killpg(runner.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self._reap(runner, grace_s=TEARDOWN_STEP_S)

    def destroy(self, box: _Box) -> None:
        if box.reused:
            return
        # Orphaned by the kill, the supervisor and the worker are our children now (subreaper).
        for pid in (box.supervisor_pid, box.worker_pid):
            deadline = time.monotonic() + TEARDOWN_STEP_S
            while pid and time.monotonic() < deadline:
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:  # its parent reaped it
                    break
                time.sleep(0.01)

    def _sweep(self) -> None:
        """Remove every entry of the scratch root that is not a live box, and whatever appeared in
        the pod's other writable directories since we started (caller holds the lock)."""
        for entry in os.scandir(self.scratch):
            if entry.name not in self._live:
                _remove(Path(entry.path))
        for directory, baseline in self._shared.items():
            for entry in os.scandir(directory):
                if entry.name not in baseline:
                    _remove(Path(entry.path))

    def close(self) -> None:
        self._stop_runner()
        _remove(self.scratch)


def _remove(path: Path) -> None:
    """Delete a file, link or tree without following links (the model may have planted them).

    A directory the model made unreadable (mkdir with mode 0) is opened up and removed again."""
    for attempt in range(2):
        try:
            if path.is_symlink() or not path.is_dir():
                path.unlink(missing_ok=True)
            else:
                shutil.rmtree(path)  # symlink-safe (fd-based) on Linux
            return
        except OSError as exc:
            if attempt:
                log.error("could not remove sandbox scratch %s: %s", path, exc)
                return
            _open_up(path)


def _open_up(root: Path) -> None:
    """chmod 0700 every directory of the tree, top-down, so that it can be listed and emptied."""
    try:
        if not root.is_symlink():
            os.chmod(root, 0o700)
    except OSError:
        pass
    for dirpath, dirnames, _ in os.walk(root, onerror=lambda e: None):
        for name in dirnames:
            child = os.path.join(dirpath, name)
            if not os.path.islink(child):
                try:
                    os.chmod(child, 0o700)
                except OSError:
                    pass


def _wait_line(stream: socket.socket, line: bytes, deadline: float) -> bool:
    """Read `stream` until `line` arrives (True), or EOF or the deadline (False)."""
    seen = b""
    stream.setblocking(True)
    while line not in seen:
        # A passed deadline still reads what has arrived (a timeout of 0 polls): the process may not
        # have run while the sandbox answered (a paused or starved host), and that is not a timeout.
        stream.settimeout(max(0.0, deadline - time.monotonic()))
        try:
            chunk = stream.recv(256)
        except (socket.timeout, OSError):
            return False
        if not chunk:
            return False
        seen += chunk
    return True


def _read_until(box: _Box, deadline: float, want_ready: bool, stdout_cap: int):
    """Read the box's stdout/stderr until `ready` (boot) or the run's end, a deadline or a flood.

    A run ends at EOF, or for a served box (whose streams carry the next execution later) at its
    status line and the end marker it names on stdout (runner.py's `_execute`), which is cut off.
    Returns (stdout bytes, reason) where reason is "ready", "eof" (the run ended), "timeout",
    "flood" (stdout over its cap) or "status_flood" (the status channel over STATUS_CAP: a
    misbehaving sandbox).
    """
    out = bytearray()
    sel = selectors.DefaultSelector()
    streams = {box.io[2]: "err"}
    if not want_ready:
        streams[box.io[1]] = "out"
    for stream, tag in streams.items():
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ, tag)
    try:
        while sel.get_map():
            # Past the deadline, poll: what the sandbox wrote before it is read, and only a run with
            # nothing left to read is a timeout. Checking the clock first called a run that finished
            # in time a timeout whenever this process had not run for a while (a host paused with
            # SIGSTOP, or starved), and discarded its output.
            remaining = max(0.0, deadline - time.monotonic())
            events = sel.select(remaining)
            if not events and remaining == 0.0:
                return bytes(out), "timeout"
            for key, _ in events:
                try:
                    chunk = os.read(key.fileobj.fileno(), 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fileobj)
                    if want_ready:
                        return bytes(out), "eof"
                    continue
                if key.data == "out":
                    out += chunk
                    if len(out) > stdout_cap:
                        return bytes(out), "flood"
                else:
                    box.status += chunk
                    if len(box.status) > STATUS_CAP:
                        return bytes(out), "status_flood"
                    if want_ready and READY in box.status:
                        head, _, rest = bytes(box.status).partition(READY)
                        for line in head.splitlines():
                            if line.startswith(b"worker "):
                                box.worker_pid, *supervisor = map(int, line.split()[1:3])
                                box.supervisor_pid = supervisor[0] if supervisor else None
                        box.status[:] = rest
                        return bytes(out), "ready"
                if box.served and not want_ready and box.status.endswith(b"\n"):
                    end = (_parse_status(box.status) or {}).get("end")
                    marker = b"\0" + str(end).encode() + b"\n"
                    if end and out.endswith(marker):
                        return bytes(out[: -len(marker)]), "eof"
        return bytes(out), "eof"
    finally:
        sel.close()


class Executor:
    """Sandbox protocol implementation: one fresh, single-use interpreter per `execute` call."""

    def __init__(
        self,
        *,
        memory_mb: int = 256,
        pids: int = 32,
        cpu_s: float = 5.0,
        timeout_s: float = 5.0,
        max_output_bytes: int = 1024,
        max_code_bytes: int = 64 << 10,
        tmpfs_mb: int = 16,
        backend: str = "auto",
        allow_weak: bool = False,
        pool_size: int = 0,
        preload: Sequence[str] | None = None,
        python: str = DEFAULT_PYTHON,
        runsc_path: str = "runsc",
        bwrap_path: str = "bwrap",
        scratch_dir: str | None = None,
        on_teardown=None,
    ):
        """`on_teardown(backend, outcome, seconds)` is called after every background teardown,
        outcome "ok", "slow" (over TEARDOWN_SLOW_S) or "failed"."""
        if backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be auto, {', '.join(BACKENDS)}, not {backend!r}")
        if backend in WEAK_BACKENDS and not allow_weak:
            raise SandboxUnavailable(
                f"backend {backend!r} is weaker than gVisor (the host kernel is exposed to the model's code); "
                "it runs only when asked for explicitly: allow_weak=True, --allow-weak-backend or "
                "ALPHAMATH_SANDBOX_ALLOW_WEAK_BACKEND=1"
            )
        self.limits = Limits(
            memory_bytes=int(memory_mb) << 20,
            pids=int(pids),
            cpu_s=float(cpu_s),
            timeout_s=float(timeout_s),
            max_output_bytes=int(max_output_bytes),
            max_code_bytes=int(max_code_bytes),
            tmpfs_bytes=int(tmpfs_mb) << 20,
            output_hard_cap=max(64 << 10, 4 * int(max_output_bytes)),
        )
        if not os.path.exists(python):
            raise SandboxUnavailable(
                f"{python} not found: the sandbox needs a Python under /usr (apt-get install python3 "
                "python3-numpy python3-sympy)"
            )
        if preload is None:
            # Nothing by default: the runner forks a worker per request, and under gVisor's ptrace
            # platform forking an interpreter with sympy loaded costs ~120 ms more (and booting it
            # ~2 s, so the pool cannot keep up). Cells that name numpy/sympy import them on demand,
            # before the code's clock starts.
            preload = ()
        self._tools = {"runsc": runsc_path, "bwrap": bwrap_path, "pod": scratch_dir}
        self.on_teardown = on_teardown
        self.teardowns = {"ok": 0, "slow": 0, "failed": 0}
        self._teardown_queue: queue.Queue[_Box | None] = queue.Queue()
        self._teardown_threads = [
            threading.Thread(target=self._teardown_loop, name=f"sandbox-teardown-{i}", daemon=True) for i in range(2)
        ]
        for t in self._teardown_threads:
            t.start()
        self._closed = threading.Event()
        try:
            self._backend = self._select_backend(backend, python, tuple(preload))
        except BaseException:
            self._stop_teardown()
            raise
        self.backend = self._backend.name
        self.strength = self._backend.strength
        self.max_parallel = self._backend.max_parallel
        self._parallel = threading.BoundedSemaphore(self.max_parallel) if self.max_parallel else None
        self.pool_size = int(pool_size) if self._backend.poolable else 0
        self._pool: queue.Queue[_Box] = queue.Queue()
        self._wake = threading.Event()
        self._refiller: threading.Thread | None = None
        if self.pool_size > 0:
            self._refiller = threading.Thread(target=self._refill_loop, name="sandbox-pool", daemon=True)
            self._refiller.start()

    @classmethod
    def from_env(cls, **overrides) -> "Executor":
        """Limits from ALPHAMATH_SANDBOX_* variables (as the sandbox service and k8s set them)."""
        spec = {
            "backend": ("BACKEND", str),
            "allow_weak": ("ALLOW_WEAK_BACKEND", _flag),
            "pool_size": ("POOL_SIZE", int),
            "memory_mb": ("MEMORY_MB", int),
            "pids": ("PIDS", int),
            "cpu_s": ("CPU_S", float),
            "timeout_s": ("TIMEOUT_S", float),
            "max_output_bytes": ("MAX_OUTPUT_BYTES", int),
            "max_code_bytes": ("MAX_CODE_BYTES", int),
            "tmpfs_mb": ("TMPFS_MB", int),
            "python": ("PYTHON", str),
            "runsc_path": ("RUNSC", str),
            "scratch_dir": ("SCRATCH_DIR", str),
        }
        kwargs = {}
        for arg, (suffix, conv) in spec.items():
            raw = os.environ.get(f"ALPHAMATH_SANDBOX_{suffix}")
            if raw:
                try:
                    kwargs[arg] = conv(raw)
                except ValueError:
                    raise ValueError(f"ALPHAMATH_SANDBOX_{suffix}={raw!r} is not a valid {conv.__name__}") from None
        kwargs.update(overrides)
        return cls(**kwargs)

    def info(self) -> dict:
        """What runs the code: shown by the service's Info RPC, its metrics and every tree's meta."""
        return {"backend": self.backend, "strength": self.strength, "production": self.backend in STRONG_BACKENDS,
                "pool_size": self.pool_size, "max_parallel": self.max_parallel or 0}

    # -- backend selection ------------------------------------------------------------------
    def _select_backend(self, wanted: str, python: str, preload: tuple[str, ...]) -> _Backend:
        errors = []
        classes = {"runsc": RunscBackend, "pod": PodBackend, "bwrap": BwrapBackend}
        for kind in STRONG_BACKENDS if wanted == "auto" else (wanted,):
            backend = None
            try:
                backend = classes[kind](self.limits, python, preload, self._tools[kind])
                self._probe(backend)
                log.info("sandbox backend %s (%s)%s", kind, backend.strength,
                         " chosen by auto" if wanted == "auto" else "")
                return backend
            except Exception as exc:  # try the next equally strong backend, keep every reason
                errors.append(f"{kind}: {exc}")
                if backend is not None:
                    backend.close()
        hint = "" if wanted != "auto" else (
            "; auto never falls back to a weaker backend: name one (--backend bwrap --allow-weak-backend) to accept that")
        raise SandboxUnavailable(f"no sandbox backend can run code ({wanted}): " + "; ".join(errors) + hint)

    def _probe(self, backend: _Backend) -> None:
        box = self._boot(backend)
        result = self._run(backend, box, ["print(6 * 7)"], time.monotonic())
        if result.stdout.strip() != "42" or result.error:
            raise SandboxStartError(f"probe printed {result.stdout!r}, error {result.error!r}")

    # -- the Sandbox protocol ---------------------------------------------------------------
    def execute(self, cells: Sequence[str]) -> ExecResult:
        """Run `cells` in order in a fresh interpreter; return the last cell's output and error."""
        started = time.monotonic()
        if isinstance(cells, str):
            raise TypeError("cells must be a sequence of code strings, not one string")
        cells = list(cells)
        if not all(isinstance(c, str) for c in cells):
            raise TypeError("every cell must be a str")
        size = sum(len(c.encode("utf-8", "surrogatepass")) for c in cells)
        if size > self.limits.max_code_bytes:
            raise ValueError(
                f"code too large: {size} bytes in {len(cells)} cells exceeds max_code_bytes="
                f"{self.limits.max_code_bytes}"
            )
        if not cells:
            return ExecResult(stdout="", duration_s=time.monotonic() - started, backend=self.backend)
        if self._closed.is_set():
            raise RuntimeError("Executor is closed")
        if self._parallel is None:
            return self._run(self._backend, self._take(), cells, started)
        with self._parallel:
            return self._run(self._backend, self._take(), cells, started)

    def close(self) -> None:
        """Stop the pool, destroy idle sandboxes, finish pending teardowns, remove bundles/state."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        if self._refiller:
            self._refiller.join(timeout=self.limits.startup_timeout_s + 5)
        while True:
            try:
                self._teardown_queue.put(self._pool.get_nowait())
            except queue.Empty:
                break
        self._stop_teardown()
        self._backend.close()

    def drain(self, timeout_s: float = 60.0) -> bool:
        """Wait until every used sandbox has been torn down; False if `timeout_s` passed first."""
        deadline = time.monotonic() + timeout_s
        while self._teardown_queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _stop_teardown(self) -> None:
        for _ in self._teardown_threads:
            self._teardown_queue.put(None)
        for t in self._teardown_threads:
            t.join(timeout=4 * TEARDOWN_STEP_S)

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- internals --------------------------------------------------------------------------
    def _boot(self, backend: _Backend) -> _Box:
        box = backend.launch()
        if box.served:  # its runner said ready when the sandbox started
            return box
        try:
            _, reason = _read_until(
                box, time.monotonic() + self.limits.startup_timeout_s, want_ready=True, stdout_cap=0
            )
        except BaseException:
            backend.destroy(box)
            raise
        if reason != "ready":
            backend.destroy(box)
            detail = box.status.decode("utf-8", "replace").strip()[-2000:]
            raise SandboxStartError(f"{backend.name} sandbox did not start ({reason}): {detail}")
        return box

    def _take(self) -> _Box:
        if self.pool_size > 0:
            try:
                box = self._pool.get_nowait()
                self._wake.set()
                if box.proc.poll() is None:
                    return box
                self._discard(self._backend, box)
            except queue.Empty:
                self._wake.set()
        return self._boot(self._backend)

    def _refill_loop(self) -> None:
        while not self._closed.is_set():
            if self._pool.qsize() >= self.pool_size:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                box = self._boot(self._backend)
            except Exception as exc:
                log.error("sandbox pool could not boot a sandbox: %s", exc)
                self._closed.wait(1.0)
                continue
            if self._closed.is_set():
                self._backend.destroy(box)
                return
            self._pool.put(box)

    def _discard(self, backend: _Backend, box: _Box) -> None:
        """Hand a used sandbox to the teardown threads (synchronously while probing a backend)."""
        if backend is getattr(self, "_backend", None):
            self._teardown_queue.put(box)
        else:
            backend.destroy(box)

    def _teardown_loop(self) -> None:
        while True:
            box = self._teardown_queue.get()
            if box is None:
                self._teardown_queue.task_done()
                return
            try:
                self._teardown(box)
            finally:
                self._teardown_queue.task_done()

    def _teardown(self, box: _Box) -> None:
        """Destroy one used sandbox; count the outcome (never raises: the execution has returned)."""
        start = time.monotonic()
        try:
            self._backend.destroy(box)
            seconds = time.monotonic() - start
            outcome = "slow" if seconds > TEARDOWN_SLOW_S else "ok"
            if outcome == "slow":
                log.warning("sandbox teardown took %.1f s (backend %s)", seconds, self.backend)
        except Exception as exc:  # noqa: BLE001 - counted and logged; the execution already returned
            seconds = time.monotonic() - start
            outcome = "failed"
            log.error("sandbox teardown failed after %.1f s (backend %s): %s", seconds, self.backend, exc)
        self.teardowns[outcome] += 1
        if self.on_teardown is not None:
            try:
                self.on_teardown(self.backend, outcome, seconds)
            except Exception as exc:  # noqa: BLE001
                log.error("on_teardown callback failed: %s", exc)

    def _kill_now(self, backend: _Backend, box: _Box) -> None:
        """Stop a flooding or runaway sandbox at once; the full teardown follows in the background."""
        if backend.name in ("pod", "bwrap"):
            try:
                os.killpg(box.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _run(self, backend: _Backend, box: _Box, cells: list[str], started: float) -> ExecResult:
        lim = self.limits
        out, reason = b"", "eof"
        try:
            cells = [str(cell) for cell in cells]
            request = marshal.dumps(cells if box.cwd is None else {"cells": cells, "cwd": box.cwd}, 4).hex().encode()
            request += b"\n"
            try:
                box.io[0].settimeout(lim.startup_timeout_s)
                box.io[0].sendall(request)
                if not box.served:  # a serving runner reads the next request from the same stream
                    box.io[0].shutdown(socket.SHUT_WR)
            except OSError:  # the sandbox died already: its status says how
                pass
            # Second handshake: the runner has imported the trusted packages the cells name.
            out, reason = _read_until(box, time.monotonic() + lim.startup_timeout_s, want_ready=True, stdout_cap=0)
            if reason == "ready":
                backend.started(box)
                out, reason = _read_until(
                    box, time.monotonic() + lim.timeout_s, want_ready=False, stdout_cap=lim.output_hard_cap
                )
            box.finished = reason == "eof"
            if not box.finished:
                self._kill_now(backend, box)
        finally:
            try:
                backend.release(box)
            finally:
                self._discard(backend, box)
        stdout = out[: lim.max_output_bytes].decode("utf-8", "replace")
        if len(out) > lim.max_output_bytes:
            stdout = stdout.rstrip("\ufffd") + "\n...[output truncated]"
        duration = time.monotonic() - started
        result = functools.partial(ExecResult, stdout, duration_s=duration, backend=backend.name)
        if reason == "timeout":
            return result(f"TimeoutError: execution exceeded {lim.timeout_s:g} s", True)
        if reason == "flood":
            return result(f"OutputLimitExceeded: output exceeded {lim.output_hard_cap} bytes", False)
        if reason == "status_flood":
            return result(f"SandboxError: the sandbox wrote more than {STATUS_CAP} bytes of status", False)
        status = _parse_status(box.status)
        if status is None:
            detail = box.status.decode("utf-8", "replace").strip()[-300:]
            return result(
                "SandboxError: the interpreter ended without a result; memory, process or CPU limit exceeded"
                + (f" ({detail})" if detail else ""),
                False,
            )
        return result(status.get("error"), bool(status.get("timed_out")))


def _flag(raw: str) -> bool:
    low = raw.strip().lower()
    if low not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError(raw)
    return low in ("1", "true", "yes", "on")


def _ended_cleanly(box: _Box) -> bool:
    """The runner reported a status (so its worker is gone) and emptied the places it sweeps."""
    status = _parse_status(box.status) if box.finished else None
    return bool(status) and status.get("swept") is True


def _parse_status(raw: bytes | bytearray) -> dict | None:
    for line in reversed(bytes(raw).splitlines()):
        try:
            status = json.loads(line)
        except ValueError:
            continue
        if isinstance(status, dict) and "error" in status:
            return status
    return None
