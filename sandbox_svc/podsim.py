"""The sandbox service the way Kubernetes runs it, on one host: `runsc run` of a pod-shaped bundle.

What `k8s/base/sandbox.yaml` asks of the pod, as an OCI bundle: gVisor as the runtime, uid/gid
10001, no capabilities, noNewPrivileges, a read-only root (the host's /usr and Python install and
this repository, all read-only, standing in for the image), a size-limited tmpfs /tmp (the pod's
emptyDir) and /dev/shm, its own network namespace with loopback only (no egress, as the
NetworkPolicy has it), and memory/pids limits. The service inside is `python -m sandbox_svc
--backend pod`; it listens on a Unix socket in a bind-mounted host directory (runsc
--host-uds=create), so the host calls Execute over gRPC from outside the pod.

Used by tests/test_sandbox_pod.py and `python -m sandbox_svc.bench`. Needs root on the host (runsc).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc

from alphamath.pb import sandbox_pb2, sandbox_pb2_grpc
from alphamath.sandbox.executor import ro_root_layout

REPO = Path(__file__).resolve().parents[1]
POD_UID = 10001
SOCKET_DIR = "/run/alphamath"
# Planted in the service's environment: no execution may ever see it.
CANARY_ENV = "ALPHAMATH_POD_CANARY"


def remote_execute(channel: grpc.Channel, timeout: float = 120.0):
    """`execute(cells) -> ExecResult` over SandboxService on `channel` (for sandbox_svc.containment)."""
    from alphamath.interfaces import ExecResult

    stub = sandbox_pb2_grpc.SandboxServiceStub(channel)

    def execute(cells):
        r = stub.Execute(sandbox_pb2.ExecuteRequest(cells=list(cells)), timeout=timeout)
        return ExecResult(r.stdout, r.error if r.HasField("error") else None, r.timed_out, r.duration_s, r.backend)

    return execute


class PodSandbox:
    """Start/stop the service in a pod-shaped gVisor sandbox; `address` is its gRPC target."""

    def __init__(self, *, pool_size: int = 2, max_concurrency: int = 4, timeout_s: float = 5.0,
                 memory_mb: int = 256, pod_memory_mb: int = 2048, tmp_mb: int = 64, extra_args=(),
                 runsc: str = "runsc", startup_timeout_s: float = 180.0):
        self.runsc = shutil.which(runsc) or runsc
        self.pool_size, self.startup_timeout_s = pool_size, startup_timeout_s
        self.canary = uuid.uuid4().hex
        self.cid = f"alphamath-pod-{uuid.uuid4().hex[:12]}"
        self.workdir = Path(tempfile.mkdtemp(prefix="alphamath-pod-"))
        os.chmod(self.workdir, 0o711)
        self.sockdir = self.workdir / "sock"
        self.sockdir.mkdir(mode=0o700)
        os.chown(self.sockdir, POD_UID, POD_UID)
        self.socket = self.sockdir / "sandbox.sock"
        self.address = f"unix:{self.socket}"
        self.log_path = self.workdir / "pod.log"
        self.args = [sys.executable, "-m", "sandbox_svc", "--backend", "pod", "--host", "127.0.0.1",
                     "--port", "50054", "--metrics-port", "9104", "--uds", f"{SOCKET_DIR}/sandbox.sock",
                     "--pool-size", str(pool_size), "--max-concurrency", str(max_concurrency),
                     "--timeout-s", str(timeout_s), "--memory-mb", str(memory_mb), *extra_args]
        self.pod_memory = pod_memory_mb << 20
        self.tmp_bytes = tmp_mb << 20
        self.proc: subprocess.Popen | None = None

    # -- the bundle ---------------------------------------------------------------------------
    def _readonly_paths(self) -> list[str]:
        _, binds = ro_root_layout()
        paths = list(binds)
        for p in (sys.base_prefix, sys.prefix, str(REPO)):  # the Python the service runs on, the code
            if not any(p == b or p.startswith(b.rstrip("/") + "/") for b in paths):
                paths.append(p)
        return paths

    def _bundle(self) -> Path:
        links, _ = ro_root_layout()
        ro = self._readonly_paths()
        rootfs = self.workdir / "rootfs"
        rootfs.mkdir(mode=0o755)
        for d in ("proc", "tmp", "dev", "sys", "etc", SOCKET_DIR.lstrip("/")):
            (rootfs / d).mkdir(mode=0o755, parents=True, exist_ok=True)
        for name, target in links:
            (rootfs / name).symlink_to(target)
        for path in ro:
            dest = rootfs / path.lstrip("/")
            if os.path.isdir(path):
                dest.mkdir(parents=True, exist_ok=True)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.touch()
        for d in rootfs.rglob("*"):  # traversable by uid 10001, not listable (e.g. /root)
            if d.is_dir() and not d.is_symlink():
                d.chmod(0o711)
        mounts = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",  # the pod's emptyDir
             "options": ["nosuid", "nodev", f"size={self.tmp_bytes}", "mode=1777"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "nodev", "noexec", "size=65536k", "mode=1777"]},
            {"destination": SOCKET_DIR, "type": "bind", "source": str(self.sockdir), "options": ["rbind", "rw"]},
        ] + [{"destination": p, "type": "bind", "source": p,
              "options": ["rbind" if os.path.isdir(p) else "bind", "ro", "nosuid", "nodev"]} for p in ro]
        env = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
               "ALPHAMATH_LOG_LEVEL": "INFO", CANARY_ENV: self.canary}
        no_caps = {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
        spec = {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False, "user": {"uid": POD_UID, "gid": POD_UID, "additionalGids": []},
                "args": self.args, "env": [f"{k}={v}" for k, v in env.items()], "cwd": "/",
                "capabilities": no_caps, "noNewPrivileges": True,
                "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 4096, "hard": 4096}],
            },
            "root": {"path": str(rootfs), "readonly": True},
            "hostname": "alphamath-sandbox",
            "mounts": mounts,
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
                "cgroupsPath": f"/alphamath-pod-{os.getpid()}/{self.cid}",
                "resources": {"memory": {"limit": self.pod_memory, "swap": self.pod_memory},
                              "pids": {"limit": 4096}},
                "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
                "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"],
            },
        }
        bundle = self.workdir / "bundle"
        bundle.mkdir(mode=0o700)
        (bundle / "config.json").write_text(json.dumps(spec))
        return bundle

    def _cmd(self, *args: str) -> list[str]:
        return [self.runsc, "--root", str(self.workdir / "state"), "--platform=ptrace", "--network=none",
                "--host-uds=create", *args]

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "PodSandbox":
        bundle = self._bundle()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self._cmd("run", "--bundle", str(bundle), self.cid), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"the pod exited with {self.proc.returncode}: {self.log()[-3000:]}")
            if self.socket.exists():
                try:
                    self.info(timeout=5)
                    return self
                except grpc.RpcError as e:
                    last = e
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the pod did not serve within {self.startup_timeout_s:g} s ({last}): {self.log()[-3000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def info(self, timeout: float = 10) -> sandbox_pb2.SandboxInfo:
        with self.channel() as ch:
            return sandbox_pb2_grpc.SandboxServiceStub(ch).Info(sandbox_pb2.SandboxInfoRequest(), timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for args in (("kill", self.cid, "KILL"), ("delete", "--force", self.cid)):
                subprocess.run(self._cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        subprocess.run(self._cmd("delete", "--force", self.cid), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30)
        shutil.rmtree(self.workdir, ignore_errors=True)
        for parent in Path("/sys/fs/cgroup").glob(f"*/alphamath-pod-{os.getpid()}"):
            try:
                parent.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "PodSandbox":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
