"""Containment cases: what model-written code would try against this service, run on every backend.

Each case is hostile code plus a check of what came back; every case is followed by a plain
execution that must still work. `run_cases(execute, ctx)` runs them against any
`execute(cells) -> ExecResult`; `format_table` prints one column per backend. A backend that fails
any case is not allowed in production (tests/test_sandbox_containment.py enforces that).

`python -m sandbox_svc.containment [--backends runsc,pod,bwrap]` prints the table (needs root
and runsc; `pod` runs the service inside a pod-shaped gVisor sandbox, see sandbox_svc.podsim).
"""
from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass
from typing import Callable

from alphamath.interfaces import ExecResult

# Places a model would like to write to: system and interpreter directories, the service's code.
WRITE_TARGETS = ("/usr/pwned", "/pwned", "/etc/pwned", "/usr/lib/python3/dist-packages/pwned.py",
                 "/opt/alphamath/pwned.py", "/work/main/sandbox_svc/pwned.py", "/run/alphamath/pwned")

NETWORK = """
import socket
targets = [("127.0.0.1", 50054), ("127.0.0.1", 9104), ("127.0.0.1", {host_port}), ("1.1.1.1", 53),
           ("1.1.1.1", 443), ("169.254.169.254", 80), ("10.96.0.1", 443)]
for host, port in targets:
    try:
        with socket.socket() as s:
            s.settimeout(0.5)
            s.connect((host, port))
            print("CONNECTED", host, port)
    except OSError as e:
        print("blocked")
for path in ("/run/alphamath/sandbox.sock", "/var/run/docker.sock", "/run/containerd/containerd.sock"):
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            print("CONNECTED", path)
    except OSError:
        print("blocked")
try:
    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    print("CONNECTED netlink")
except OSError:
    print("blocked")
"""

IDENTITY = """
import os
status = open("/proc/self/status").read()
caps = sorted({l.split()[1] for l in status.splitlines() if l.startswith(("CapEff", "CapPrm", "CapBnd"))})
print(os.getuid(), os.geteuid(), os.getgid(), caps)
"""

HOST_FILES = """
import os
for path in ("/etc/shadow", "/root/.bashrc", "/root/.ssh/id_rsa", "/var/run/secrets/kubernetes.io/serviceaccount/token",
             "/proc/1/root/etc/shadow"):
    try:
        open(path).read()
        print("READ", path)
    except OSError:
        print("denied")
for d in ("/root", "/home", "/var/run/secrets"):
    try:
        print("LISTED", d, os.listdir(d))
    except OSError:
        print("denied")
"""

WRITES = """
import os
for path in {targets!r}:
    try:
        with open(path, "w") as f:
            f.write("x")
        print("WROTE", path)
    except OSError:
        print("denied")
with open("scratch.txt", "w") as f:
    f.write("scratch ok")
print(open("scratch.txt").read())
"""

FORK_BOMB = "import os\nwhile True:\n    os.fork()"
SUBPROCESS = "import subprocess\nprint(subprocess.run(['/bin/sh', '-c', 'echo spawned'], capture_output=True).stdout)"
THREAD_BOMB = """
import threading, time
threads = []
try:
    while True:
        t = threading.Thread(target=time.sleep, args=(30,), daemon=True)
        t.start()
        threads.append(t)
except BaseException as e:
    print("stopped at", len(threads), type(e).__name__)
"""
MEMORY_BOMB = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))"
INFINITE_LOOP = "while True:\n    pass"
STDOUT_FLOOD = "for _ in range(1_000_000):\n    print('x' * 99)"
STDERR_FLOOD = "import sys\nfor _ in range(200_000):\n    sys.stderr.write('x' * 99 + '\\n')\nprint('flooded stderr')"

PTRACE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
# the supervisor, pid 1, and every other process it can see (a runsc sandbox's serving runner)
others = {int(p) for p in os.listdir("/proc") if p.isdigit()} - {os.getpid()}
local = ctypes.create_string_buffer(16)
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
iov = iovec(ctypes.addressof(local), 16)
for pid in sorted(others | {os.getppid(), 1}):
    r = libc.ptrace(16, pid, 0, 0)  # PTRACE_ATTACH
    print("ATTACHED" if r == 0 else "denied", pid)
    r = libc.ptrace(0x4206, pid, 0, 0)  # PTRACE_SEIZE
    print("ATTACHED" if r == 0 else "denied", pid)
    r = libc.process_vm_readv(pid, ctypes.byref(iov), 1, ctypes.byref(iov), 1, 0)
    print("READ_PEER" if r > 0 else "denied", pid)
"""

PROC_SNOOP = """
import os
me = os.getpid()
env_seen = set()
for pid in sorted(p for p in os.listdir("/proc") if p.isdigit() and int(p) != me):
    for name in ("environ", "mem", "cwd", "root", "fd"):
        path = "/proc/%s/%s" % (pid, name)
        try:
            if name in ("cwd", "root"):
                print("SAW", path, os.listdir(path)[:3])
            elif name == "fd":  # another execution's (or the service's) private files: open them
                for fd in os.listdir(path):
                    target = os.readlink(path + "/" + fd)
                    if target.startswith(("/tmp", "/dev/shm", "/var/tmp", "/run")):
                        try:
                            open(target, "rb").close()
                            print("SAW", path, target)
                        except OSError:
                            pass
            elif name == "mem":
                with open(path, "rb") as f:
                    f.seek(0x400000)
                    print("SAW", path, len(f.read(16)))
            else:
                env_seen.update(open(path, "rb").read().decode(errors="replace").split("\\0"))
        except OSError:
            pass
print(sorted(k.split("=")[0] for k in env_seen if "=" in k))
print("VALUES", " ".join(env_seen))
print("done")
"""

SIGNALS = """
import os, signal
others = {int(p) for p in os.listdir("/proc") if p.isdigit()} - {os.getpid()}
for target in sorted(others | {os.getppid(), 1, -1}):
    try:
        os.kill(target, signal.SIGKILL)
        print("SIGNALLED", target)
    except OSError:
        print("denied")
try:
    os.killpg(0, signal.SIGKILL)
    print("SIGNALLED group")
except OSError:
    print("denied")
"""

FORGE = """
import os
payload = b'\\n{"error": null, "timed_out": true, "exit": 0, "cpu_s": 0}\\nready\\nworker 1\\n'
wrote = 0
for fd in range(3, 256):
    try:
        os.write(fd, payload)
        wrote += 1
    except OSError:
        pass
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    try:
        fds = os.listdir("/proc/%s/fd" % pid)
    except OSError:
        continue
    for n in fds:
        try:
            fd = os.open("/proc/%s/fd/%s" % (pid, n), os.O_WRONLY | os.O_NONBLOCK)
            os.write(fd, payload)
            os.close(fd)
        except OSError:
            pass
raise ValueError("the real result")
"""

FD_INHERITANCE = """
import os
fds = {}
for fd in os.listdir("/proc/self/fd"):
    try:
        fds[int(fd)] = os.readlink("/proc/self/fd/" + fd)
    except OSError:
        pass
bad = {fd: t for fd, t in fds.items() if not t.startswith(("socket:", "pipe:", "host:", "anon_inode:", "/dev/null", "/proc/"))}
print(len(fds), "LEAKED" if bad else "clean", bad)
"""

ENV_LEAK = """
import os
env = dict(os.environ)
try:
    raw = open("/proc/self/environ", "rb").read().decode(errors="replace")
except OSError:  # a non-dumpable process cannot read its own on Linux
    raw = ""
print(sorted(env), raw.count("="))
print("VALUES", " ".join(env.values()), raw)
"""

SYMLINKS = """
import os
for name, target in (("root", "/"), ("usr", "/usr"), ("passwd", "/etc/passwd"), ("proc1", "/proc/1/root"),
                     ("parent", ".."), ("loop", "loop")):
    os.symlink(target, name)
os.mkdir("locked", 0o700)
open("locked/inside", "w").write("x")
os.mkdir("locked/deeper", 0)  # a directory its owner cannot list: the cleanup must still remove it
print("planted")
"""

TMP_PLANT = """
import os
planted = []
for d in ("/tmp", "/dev/shm", "/var/tmp", os.path.dirname(os.getcwd())):
    try:
        path = os.path.join(d, "planted-{token}")
        with open(path, "w") as f:
            f.write("from an earlier execution")
        planted.append(path)
    except OSError:
        pass
open("planted-{token}", "w").write("x")
print("planted", len(planted))
"""

TMP_LOOK = """
import os
found = []
for d in ("/tmp", "/dev/shm", "/var/tmp", os.getcwd(), os.path.dirname(os.getcwd())):
    if os.path.exists(os.path.join(d, "planted-{token}")):
        found.append(d)
    try:
        found += [os.path.join(d, n) for n in os.listdir(d) if n.startswith("planted-")]
    except OSError:
        pass
print("FOUND" if found else "clean", found)
"""

RLIMITS = """
import os, resource
raised = []
for name in ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_NOFILE"):
    which = getattr(resource, name)
    soft, hard = resource.getrlimit(which)
    try:
        resource.setrlimit(which, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        raised.append(name)
    except (ValueError, OSError):
        pass
    try:
        resource.prlimit(os.getppid(), which, (0, 0))
        raised.append("parent " + name)
    except (ValueError, OSError):
        pass
    if hard == resource.RLIM_INFINITY:
        raised.append("unlimited " + name)
print("RAISED" if raised else "held", raised)
"""

DISK_FILL = """
import os
written = 0
for d in (".", "/tmp", "/dev/shm"):
    for i in range(32):
        try:
            with open(os.path.join(d, "fill-%d" % i), "wb") as f:
                for _ in range(8):
                    f.write(b"x" * (1 << 20))
                    written += 1 << 20
        except OSError:
            break
print("filled", written >> 20, "MiB")
"""

DISK_AFTER = """
with open("after-fill", "wb") as f:
    f.write(b"y" * (4 << 20))
print("wrote 4 MiB")
"""

SESSION = """
import os
for call in (os.setsid, lambda: os.setpgid(0, 0)):
    try:
        call()
        print("LEFT GROUP")
    except OSError:
        print("denied")
"""

IPC_PLANT = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
key = 0x{token_key}
made = [name for name, call in (("shm", lambda: libc.shmget(key, 4096, 0o1666)),
                                ("msg", lambda: libc.msgget(key, 0o1666)),
                                ("sem", lambda: libc.semget(key, 1, 0o1666))) if call() >= 0]
try:
    made += ["mq"] if libc.mq_open(b"/planted-{token}", 0o100 | 2, 0o666, None) >= 0 else []
except AttributeError:
    pass
print("made", made)
"""

IPC_LOOK = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
key = 0x{token_key}
found = [name for name, call in (("shm", lambda: libc.shmget(key, 0, 0)), ("msg", lambda: libc.msgget(key, 0)),
                                 ("sem", lambda: libc.semget(key, 0, 0))) if call() >= 0]
try:
    found += ["mq"] if libc.mq_open(b"/planted-{token}", 0) >= 0 else []
except AttributeError:
    pass
print("FOUND" if found else "clean", found)
"""

NAMESPACES = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
for flags in (0x10000000, 0x00020000, 0x20000000, 0x40000000):  # NEWUSER, NEWNS, NEWPID, NEWNET
    print("UNSHARED" if libc.unshare(flags) == 0 else "denied")
r = libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)
print("MOUNTED" if r == 0 else "denied")
"""


VICTIM = """
import time
with open("private.txt", "w+") as f:
    f.write("{token}-victim")
    f.flush()
    time.sleep(2.5)
    f.seek(0)
    print(f.read())
"""

NEIGHBOUR = """
import os, time
stolen = []
deadline = time.time() + 2.0
while time.time() < deadline and not stolen:
    for pid in [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]:
        try:
            fds = os.listdir("/proc/%s/fd" % pid)
        except OSError:
            continue
        for n in fds:
            link = "/proc/%s/fd/%s" % (pid, n)
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target.endswith("private.txt"):
                for path in (target, link):
                    try:
                        with open(path, "r+") as g:
                            stolen.append(g.read())
                            g.seek(0)
                            g.write("FORGED")
                    except OSError:
                        pass
    time.sleep(0.05)
print("STOLE" if stolen else "nothing", stolen)
"""


@dataclass
class Case:
    name: str
    attack: str  # what the model tries
    cells: Callable[[dict], list[str]]
    check: Callable[[ExecResult, dict], str | None]  # None = contained, else what went wrong
    follow: Callable[[dict], list[str]] | None = None  # a second execution, checked by follow_check
    follow_check: Callable[[ExecResult, dict], str | None] | None = None
    # Run `cells` and `neighbour` at the same time (another request's code); `check` sees both.
    neighbour: Callable[[dict], list[str]] | None = None


def _absent(*markers):
    def check(r: ExecResult, ctx: dict) -> str | None:
        text = r.stdout + (r.error or "")
        hits = [m for m in markers if re.search(r"\b" + m + r"\b", text)]
        return f"{hits} in {text[:300]!r}" if hits else None
    return check


def _all(*checks):
    def check(r, ctx):
        for c in checks:
            problem = c(r, ctx)
            if problem:
                return problem
        return None
    return check


def _error_matching(pattern):
    def check(r, ctx):
        return None if r.error and re.search(pattern, r.error) else f"error {r.error!r} does not match {pattern!r}"
    return check


def _bounded(r, ctx):
    limit = ctx["timeout_s"] + 10
    return None if r.duration_s < limit else f"took {r.duration_s:.1f} s (limit {limit:g})"


def _identity(r, ctx):
    m = re.match(r"(\d+) (\d+) (\d+) (\[.*\])", r.stdout)
    if not m:
        return f"no identity in {r.stdout!r} {r.error!r}"
    uid, euid, gid, caps = int(m[1]), int(m[2]), int(m[3]), m[4]
    if 0 in (uid, euid, gid):
        return f"runs as root ({uid}/{euid}/{gid})"
    return None if caps == "['0000000000000000']" else f"capabilities {caps}"


def _forge(r, ctx):
    if r.timed_out or r.error != "ValueError: the real result":
        return f"forged: error={r.error!r} timed_out={r.timed_out}"
    return None


def _env(r, ctx):
    text = r.stdout
    if ctx.get("canary") and ctx["canary"] in text:
        return "the service's environment is visible"
    keys = re.findall(r"'([A-Z_][A-Z0-9_]*)'", text.splitlines()[0] if text else "")
    leaked = [k for k in keys if k.startswith(("ALPHAMATH", "KUBERNETES", "AWS", "GOOGLE", "HF_"))]
    return f"inherited {leaked}" if leaked else (None if text else f"no output, error {r.error!r}")


def _fill(r, ctx):
    return None if "filled" in r.stdout or r.error else f"unexpected {r}"


def _wrote_after(r, ctx):
    return None if r.stdout == "wrote 4 MiB\n" and r.error is None else f"next execution could not write: {r}"


def _tmp_look(r, ctx):
    return None if r.stdout.startswith("clean") else f"an earlier execution's files are visible: {r.stdout[:300]!r}"


def _neighbour(pair, ctx):
    victim, attacker = pair
    if attacker.stdout.startswith("STOLE") or ctx["token"] in attacker.stdout:
        return f"the neighbour read the victim's file: {attacker.stdout[:200]!r}"
    if victim.stdout != f"{ctx['token']}-victim\n" or victim.error:
        return f"the victim's result changed: {victim}"
    return None


def _ran(r, ctx):
    return None if r.error is None else f"error {r.error!r}"


CASES: list[Case] = [
    Case("identity", "run as root or with capabilities", lambda c: [IDENTITY], _identity),
    Case("network", "reach the service's own ports, the host, the internet, the metadata server, sockets",
         lambda c: [NETWORK.format(host_port=c["host_port"])], _all(_absent("CONNECTED"), _ran)),
    Case("host_files", "read host secrets and service-account tokens", lambda c: [HOST_FILES],
         _all(_absent("READ", "LISTED"), _ran)),
    Case("writes", "write to the image, the interpreter or the service's code", lambda c: [WRITES.format(targets=WRITE_TARGETS)],
         lambda r, c: _absent("WROTE")(r, c) or (None if r.stdout.endswith("scratch ok\n") else f"cwd not writable: {r}")),
    Case("fork_bomb", "fork until the node falls over", lambda c: [FORK_BOMB], _all(_error_matching("."), _bounded)),
    Case("subprocess", "spawn a shell", lambda c: [SUBPROCESS], _all(_absent("spawned"), _error_matching("."))),
    Case("thread_bomb", "start threads until the node falls over", lambda c: [THREAD_BOMB], _bounded),
    Case("memory_bomb", "allocate until the node falls over", lambda c: [MEMORY_BOMB],
         _all(_error_matching("MemoryError|SandboxError"), _bounded)),
    Case("infinite_loop", "never finish", lambda c: ["print('started')", INFINITE_LOOP],
         lambda r, c: None if r.timed_out and r.error else f"not timed out: {r}"),
    Case("stdout_flood", "flood stdout", lambda c: [STDOUT_FLOOD],
         _all(_error_matching("^OutputLimitExceeded"), _bounded,
              lambda r, c: None if len(r.stdout) <= c["max_output_bytes"] + 64 else f"{len(r.stdout)} chars kept")),
    Case("stderr_flood", "flood stderr", lambda c: [STDERR_FLOOD],
         _all(_bounded, lambda r, c: None if len(r.stdout) <= c["max_output_bytes"] + 64 else "stderr reached the result")),
    Case("ptrace", "ptrace or read the memory of the runner or the service", lambda c: [PTRACE],
         _all(_absent("ATTACHED", "READ_PEER"), _ran)),
    Case("proc_snoop", "read other processes' environment, memory, files through /proc", lambda c: [PROC_SNOOP],
         _all(_absent("SAW"), _env, lambda r, c: None if r.stdout.endswith("done\n") else f"did not finish: {r}")),
    Case("signals", "kill the runner, the service or everything", lambda c: [SIGNALS],
         _all(_absent("SIGNALLED"), _ran)),
    Case("forge_result", "write a forged result into every descriptor it can reach or reopen", lambda c: [FORGE], _forge,
         lambda c: ["print('honest')"], lambda r, c: None if (r.stdout, r.error, r.timed_out) == ("honest\n", None, False)
         else f"a forged result reached the next execution: {r}"),
    Case("fd_inheritance", "use a descriptor inherited from the service", lambda c: [FD_INHERITANCE],
         _all(_absent("LEAKED"), _ran)),
    Case("env_leak", "read secrets from the environment", lambda c: [ENV_LEAK], _env),
    Case("symlinks", "plant links to / and unremovable directories for the cleanup to trip on", lambda c: [SYMLINKS],
         lambda r, c: None, lambda c: ["import os\nprint(os.path.exists('/usr/bin/python3'), sorted(os.listdir('.')))"],
         lambda r, c: None if r.stdout.startswith("True") and "root" not in r.stdout else f"cleanup affected: {r}"),
    Case("tmp_plant", "leave files for a later execution", lambda c: [TMP_PLANT.format(token=c["token"])],
         lambda r, c: None, lambda c: [TMP_LOOK.format(token=c["token"])], _tmp_look),
    Case("ipc_plant", "leave SysV or POSIX IPC objects for a later execution",
         lambda c: [IPC_PLANT.format(token=c["token"], token_key=c["token"][-7:])], lambda r, c: None,
         lambda c: [IPC_LOOK.format(token=c["token"], token_key=c["token"][-7:])], _absent("FOUND")),
    Case("rlimit_escape", "raise its own limits or lower the service's", lambda c: [RLIMITS], _all(_absent("RAISED"), _ran)),
    Case("disk_fill", "fill the disk for everyone", lambda c: [DISK_FILL], _all(_fill, _bounded),
         lambda c: [DISK_AFTER], _wrote_after),
    Case("session_escape", "leave its process group (to survive the kill)", lambda c: [SESSION],
         _all(_absent("LEFT GROUP"), _ran)),
    Case("namespaces", "create namespaces or mounts", lambda c: [NAMESPACES], _all(_absent("UNSHARED", "MOUNTED"), _ran)),
    Case("neighbour", "read or rewrite the files of an execution running at the same time",
         lambda c: [VICTIM.format(token=c["token"])],
         lambda pair, c: _neighbour(pair, c), neighbour=lambda c: [NEIGHBOUR]),
]


def still_works(execute) -> str | None:
    r = execute(["x = 20", "print('still alive', x + 1)"])
    return None if (r.stdout, r.error, r.timed_out) == ("still alive 21\n", None, False) else f"next execution: {r}"


def run_cases(execute, ctx: dict, cases=None) -> dict[str, str | None]:
    """{case name: None if contained (and the next execution worked), else what went wrong}."""
    ctx = {"token": f"{time.time_ns():x}", "host_port": 1, **ctx}
    results = {}
    for case in cases or CASES:
        try:
            if case.neighbour is not None:
                problem = case.check(_side_by_side(execute, case.cells(ctx), case.neighbour(ctx)), ctx)
            else:
                problem = case.check(execute(case.cells(ctx)), ctx)
            if problem is None and case.follow is not None:
                problem = case.follow_check(execute(case.follow(ctx)), ctx)
            problem = problem or still_works(execute)
        except Exception as exc:  # noqa: BLE001 - a crash of the harness or the service is a failure too
            problem = f"{type(exc).__name__}: {exc}"
        results[case.name] = problem
    return results


def _side_by_side(execute, victim_cells, attacker_cells):
    """(victim result, attacker result): the attacker starts while the victim is running."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        victim = pool.submit(execute, victim_cells)
        time.sleep(0.5)
        attacker = pool.submit(execute, attacker_cells)
        return victim.result(), attacker.result()


def format_table(by_backend: dict[str, dict[str, str | None]]) -> str:
    backends = list(by_backend)
    names = [c.name for c in CASES if any(c.name in r for r in by_backend.values())]
    width = max(len(n) for n in names)
    lines = ["containment (each case followed by a working execution)",
             f"{'case':<{width}}  " + "  ".join(f"{b:<8}" for b in backends)]
    for n in names:
        cells = ["-" if n not in by_backend[b] else "ok" if by_backend[b][n] is None else "FAIL" for b in backends]
        lines.append(f"{n:<{width}}  " + "  ".join(f"{c:<8}" for c in cells))
    verdicts = []
    for b in backends:
        fails = [n for n, p in by_backend[b].items() if p is not None]
        verdicts.append(f"{b}: " + ("all contained" if not fails else f"FAILED {len(fails)}: not allowed in production"))
    lines.append("; ".join(verdicts))
    for b in backends:
        for n, p in by_backend[b].items():
            if p is not None:
                lines.append(f"  {b} {n}: {p[:300]}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="runsc,pod,bwrap")
    args = ap.parse_args()
    from alphamath.sandbox.executor import Executor

    by_backend = {}
    for name in args.backends.split(","):
        if name == "pod":
            from sandbox_svc.podsim import PodSandbox, remote_execute

            with PodSandbox(pool_size=2) as pod:
                info = pod.info()
                with pod.channel() as ch:
                    by_backend[name] = run_cases(remote_execute(ch), {
                        "timeout_s": info.timeout_s, "max_output_bytes": info.max_output_chars, "canary": pod.canary})
        else:
            with Executor(backend=name, allow_weak=name == "bwrap") as ex:
                by_backend[name] = run_cases(ex.execute, {"timeout_s": ex.limits.timeout_s,
                                                          "max_output_bytes": ex.limits.max_output_bytes})
    print(format_table(by_backend))


if __name__ == "__main__":
    main()
