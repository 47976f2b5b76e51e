"""The code interpreter of the paper's action space: runs a solution path's code cells in a sandbox.

`Executor.execute(cells)` implements `alphamath.interfaces.Sandbox`: each call gets ONE fresh
sandboxed interpreter that replays the path's earlier cells (rebuilding state, output discarded)
and returns what the last cell printed. Nothing is ever exec'd in this process.

Backends (`Executor.backend`):
  * "runsc": gVisor (`runsc run`, ptrace platform, no network) with a generated OCI bundle:
    read-only root built from the host's /usr, size-limited tmpfs /tmp, uid/gid 65534, no
    capabilities, noNewPrivileges, rlimits, cgroup memory/pids limits;
  * "bwrap": bubblewrap, used (with a loud WARNING) only when runsc cannot start; the same
    filesystem view, all namespaces unshared, run as uid 65534 with rlimits set by prlimit.
If neither can start, construction fails: there is no in-process fallback.

Latency: a sandbox is single-use (no state can leak between requests), but it can be booted
ahead of time. With `pool_size > 0` a background thread keeps that many sandboxes booted, with
numpy/sympy already imported, waiting for their one request on stdin.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import selectors
import shutil
import signal
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
DEFAULT_PYTHON = "/usr/bin/python3"
# Host-side pids/memory the gVisor sentry and gofer need on top of what the model's code gets
# (the cgroup covers the whole sandbox, not only the guest's processes).
RUNSC_PIDS_OVERHEAD = 128
RUNSC_MEMORY_OVERHEAD = 384 << 20
STATUS_CAP = 64 << 10


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
    """One booted, single-use sandbox waiting for its request on stdin."""

    id: str
    proc: subprocess.Popen
    bundle: Path | None
    status: bytearray
    finished: bool = False


def _ro_root_layout() -> tuple[list[tuple[str, str]], list[str]]:
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


class _Backend:
    name = "?"

    def __init__(self, limits: Limits, python: str, preload: Sequence[str]):
        self.limits = limits
        self.python = python
        self.runner_args = json.dumps(
            {
                "cpu_s": limits.cpu_s,
                "memory_bytes": limits.memory_bytes,
                "pids": limits.pids,
                "file_bytes": limits.tmpfs_bytes,
                "preload": list(preload),
                "lazy": list(LAZY_IMPORTS),
            }
        )
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

    def close(self) -> None:
        pass

    @staticmethod
    def _popen(argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
            start_new_session=True,
            **kw,
        )

    @staticmethod
    def _reap(box: _Box, grace_s: float = 2.0) -> None:
        for stream in (box.proc.stdin, box.proc.stdout, box.proc.stderr):
            try:
                if stream:
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
    """gVisor: each sandbox is `runsc run` of a fresh OCI bundle over a shared read-only rootfs."""

    name = "runsc"

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
        links, binds = _ro_root_layout()
        self._build_rootfs(links, binds)
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

    def launch(self) -> _Box:
        cid = f"am-{uuid.uuid4().hex[:20]}"
        bundle = self.workdir / cid
        bundle.mkdir(mode=0o700)
        (bundle / "config.json").write_text(json.dumps(self._spec(cid)))
        proc = self._popen(self._cmd("run", "--bundle", str(bundle), cid))
        return _Box(cid, proc, bundle, bytearray())

    def destroy(self, box: _Box) -> None:
        if box.finished:
            try:  # the guest exited: `runsc run` is tearing the sandbox down by itself
                box.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                pass
        if box.proc.poll() is None:
            # Kill the sandbox itself (the sentry), not only the `runsc run` client.
            for args in (("kill", box.id, "KILL"), ("delete", "--force", box.id)):
                subprocess.run(self._cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        self._reap(box)
        if list(self.state.glob(f"*{box.id}*")):
            subprocess.run(
                self._cmd("delete", "--force", box.id),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=30,
            )
        if box.bundle:
            shutil.rmtree(box.bundle, ignore_errors=True)

    def close(self) -> None:
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

    def __init__(self, limits: Limits, python: str, preload: Sequence[str], bwrap: str = "bwrap"):
        super().__init__(limits, python, preload)
        self.bwrap = shutil.which(bwrap)
        self.prlimit = shutil.which("prlimit")
        if not self.bwrap or not self.prlimit:
            raise SandboxUnavailable(f"bwrap ({bwrap}) or prlimit not found")
        links, binds = _ro_root_layout()
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
            f"--nproc={limits.pids + 8}",
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
        proc = self._popen(argv, cwd="/")
        return _Box(f"bw-{uuid.uuid4().hex[:12]}", proc, None, bytearray())

    def destroy(self, box: _Box) -> None:
        if box.proc.poll() is None:
            try:
                os.killpg(box.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                box.proc.kill()
        self._reap(box)


def _read_until(box: _Box, deadline: float, want_ready: bool, stdout_cap: int):
    """Read the box's stdout/stderr until `ready` (boot) or EOF (run), a deadline or a flood.

    Returns (stdout bytes, reason) where reason is "ready", "eof", "timeout" or "flood".
    """
    out = bytearray()
    sel = selectors.DefaultSelector()
    streams = {box.proc.stderr: "err"}
    if not want_ready:
        streams[box.proc.stdout] = "out"
    for stream, tag in streams.items():
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ, tag)
    try:
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(out), "timeout"
            for key, _ in sel.select(remaining):
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
                    if len(box.status) < STATUS_CAP:
                        box.status += chunk[: STATUS_CAP - len(box.status)]
                    if want_ready and b"ready\n" in box.status:
                        del box.status[: box.status.index(b"ready\n") + len(b"ready\n")]
                        return bytes(out), "ready"
        return bytes(out), "eof"
    finally:
        sel.close()


class Executor:
    """Sandbox protocol implementation: one fresh, single-use sandbox per `execute` call."""

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
        pool_size: int = 0,
        preload: Sequence[str] | None = None,
        python: str = DEFAULT_PYTHON,
        runsc_path: str = "runsc",
        bwrap_path: str = "bwrap",
    ):
        if backend not in ("auto", "runsc", "bwrap"):
            raise ValueError(f"backend must be auto, runsc or bwrap, not {backend!r}")
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
            # Importing sympy dominates a cold sandbox (about 1 s under gVisor's ptrace platform):
            # worth paying ahead of time in pooled sandboxes, pointless on the request path.
            preload = ("numpy", "sympy") if pool_size > 0 else ()
        self._tools = {"runsc": runsc_path, "bwrap": bwrap_path}
        self._backend = self._select_backend(backend, python, tuple(preload))
        self.backend = self._backend.name
        self.pool_size = int(pool_size)
        self._pool: queue.Queue[_Box] = queue.Queue()
        self._closed = threading.Event()
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

    # -- backend selection ------------------------------------------------------------------
    def _select_backend(self, wanted: str, python: str, preload: tuple[str, ...]) -> _Backend:
        errors = []
        for kind in ("runsc", "bwrap") if wanted == "auto" else (wanted,):
            backend = None
            try:
                cls = RunscBackend if kind == "runsc" else BwrapBackend
                backend = cls(self.limits, python, preload, self._tools[kind])
                self._probe(backend)
                if kind == "bwrap" and wanted == "auto":
                    log.warning(
                        "WARNING: gVisor runsc cannot run here (%s); FALLING BACK to bubblewrap, a weaker "
                        "sandbox (host kernel exposed to the model's code)",
                        "; ".join(errors),
                    )
                return backend
            except Exception as exc:  # try the next backend, but keep every reason for the error
                errors.append(f"{kind}: {exc}")
                if backend is not None:
                    backend.close()
        raise SandboxUnavailable("no sandbox backend can run code: " + "; ".join(errors))

    def _probe(self, backend: _Backend) -> None:
        box = self._boot(backend)
        result = self._run(backend, box, ["print(6 * 7)"], time.monotonic())
        if result.stdout.strip() != "42" or result.error:
            raise SandboxStartError(f"probe printed {result.stdout!r}, error {result.error!r}")

    # -- the Sandbox protocol ---------------------------------------------------------------
    def execute(self, cells: Sequence[str]) -> ExecResult:
        """Run `cells` in order in a fresh sandbox; return the last cell's output and error."""
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
            return ExecResult(stdout="", duration_s=time.monotonic() - started)
        if self._closed.is_set():
            raise RuntimeError("Executor is closed")
        box = self._take()
        return self._run(self._backend, box, cells, started)

    def close(self) -> None:
        """Stop the pool, destroy idle sandboxes and remove bundles/state."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        if self._refiller:
            self._refiller.join(timeout=self.limits.startup_timeout_s + 5)
        while True:
            try:
                self._backend.destroy(self._pool.get_nowait())
            except queue.Empty:
                break
        self._backend.close()

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
                self._backend.destroy(box)
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

    def _run(self, backend: _Backend, box: _Box, cells: list[str], started: float) -> ExecResult:
        lim = self.limits
        try:
            request = (json.dumps({"cells": cells}) + "\n").encode()
            try:
                box.proc.stdin.write(request)
                box.proc.stdin.close()
            except BrokenPipeError:
                pass
            # Second handshake: the runner has imported the trusted packages the cells name.
            out, reason = _read_until(box, time.monotonic() + lim.startup_timeout_s, want_ready=True, stdout_cap=0)
            if reason == "ready":
                out, reason = _read_until(
                    box, time.monotonic() + lim.timeout_s, want_ready=False, stdout_cap=lim.output_hard_cap
                )
            box.finished = reason == "eof"
        finally:
            backend.destroy(box)
        stdout = out[: lim.max_output_bytes].decode("utf-8", "replace")
        if len(out) > lim.max_output_bytes:
            stdout = stdout.rstrip("\ufffd") + "\n...[output truncated]"
        status = _parse_status(box.status)
        duration = time.monotonic() - started
        if reason == "timeout":
            return ExecResult(stdout, f"TimeoutError: execution exceeded {lim.timeout_s:g} s", True, duration)
        if reason == "flood":
            return ExecResult(
                stdout, f"OutputLimitExceeded: output exceeded {lim.output_hard_cap} bytes", False, duration
            )
        if status is None:
            code = box.proc.returncode
            return ExecResult(
                stdout,
                f"SandboxError: the interpreter was killed (exit status {code}); "
                "memory, process or CPU limit exceeded",
                code in (152, -signal.SIGXCPU),
                duration,
            )
        timed_out = bool(status.get("timed_out"))
        return ExecResult(stdout, status.get("error"), timed_out, duration)


def _parse_status(raw: bytes | bytearray) -> dict | None:
    for line in reversed(bytes(raw).splitlines()):
        try:
            status = json.loads(line)
        except ValueError:
            continue
        if isinstance(status, dict) and "error" in status:
            return status
    return None
