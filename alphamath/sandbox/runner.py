"""The program that runs INSIDE the sandbox (gVisor, the gVisor pod, or bubblewrap); never imported
by a service.

It is passed to the sandboxed interpreter as `python3 -I -B -c <this source> <limits>` (the limits as
hex of marshal data), so it must use the standard library only and must not import anything from this
repository.

Two processes, so that the result channel is out of reach of the model's code:
  * the supervisor (this process) holds the status channel (the original stderr, read by the host)
    and never runs model code. The host gives us sockets, not pipes, as stdio: inside gVisor a
    pipe could be reopened through /proc/<pid>/fd/N by the worker, a socket cannot;
  * the worker, forked per request, runs the cells. Before the first cell it drops the status
    channel, becomes non-dumpable, installs a seccomp filter (no new processes, no ptrace, no
    signals or rlimit changes aimed at other processes, no sockets, no namespace or mode changes)
    and tightens its rlimits (CPU, AS, NPROC, FSIZE, NOFILE).
The supervisor reports what it observed itself (exit status, CPU time used); the worker only
contributes the last cell's traceback line, over a pipe of its own (text the model could have
produced anyway by raising its own exception).

Protocol with the host (`alphamath.sandbox.executor`), status lines on the original stderr:
  1. preload the configured modules, then "ready";
  2. read one line from stdin, the cells as hex of `marshal.dumps(cells)` (or of {"cells", "cwd"}: the
     directory to run in); import the `lazy` modules the cells name (trusted system packages, so a
     slow import is not charged to the code), fork the worker, then "worker <pid> <supervisor pid>"
     and "ready" (the host's wall clock for the model's code starts here);
  3. the worker streams the last cell's stdout to stdout (the host caps it); earlier cells' output
     and all stderr go to /dev/null;
  4. it empties the `sweep` directories (a reused runsc sandbox: nothing carries over);
  5. one JSON status line {"error", "timed_out", "exit", "cpu_s", "swept"}, then exit.
With "serve" in the limits (one runner per runsc sandbox or per pod) steps 2-5 repeat, each in a fresh fork
of this process that exits afterwards (`_serve`): stdout then stays open between executions, so
step 5 first writes an end marker to stdout and names it in the status ("end").
The limits (argv) and the cells come from the host only, as marshal data (a builtin module: under
gVisor's ptrace platform, importing json, socket and traceback took ~30 ms of CPU of each ~150 ms
execution). Nothing from the worker is read with marshal: its report is a hex line, and the status
is written by hand as JSON (`_json`, json.dumps' ensure_ascii output).
"""
import _socket
import ctypes
import marshal
import os
import resource
import signal
import struct
import sys

READY = b"ready\n"
ERROR_REPORT_CAP = 4096

# --- seccomp (x86_64 only: on any other architecture the worker refuses to run code) -----------
AUDIT_ARCH_X86_64 = 0xC000003E
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_SET_DUMPABLE = 38, 22, 4
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
EPERM, ENOSYS = 1, 38
# Denied outright (EPERM): process inspection, other-process scheduling, namespaces and mounts,
# permission changes (the scratch root must stay unlistable), kernel attack surface.
DENY = {
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
    "pidfd_open": 434, "pidfd_send_signal": 424, "pidfd_getfd": 438, "tkill": 200,
    "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297, "setpriority": 141, "sched_setscheduler": 144,
    "sched_setparam": 142, "sched_setattr": 314, "ioprio_set": 251, "migrate_pages": 256,
    "move_pages": 279, "process_madvise": 440, "setsid": 112, "setpgid": 109,
    "chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452,
    "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
    "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "keyctl": 250, "add_key": 248,
    "request_key": 249, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "syslog": 103, "socket": 41, "fork": 57, "vfork": 58,
    # SysV and POSIX IPC objects outlive the process: in a reused sandbox they would carry state
    # from one execution to the next.
    "shmget": 29, "shmat": 30, "shmctl": 31, "shmdt": 67, "semget": 64, "semop": 65, "semctl": 66,
    "semtimedop": 220, "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71, "mq_open": 240,
    "mq_unlink": 241, "mq_timedsend": 242, "mq_timedreceive": 243, "mq_notify": 244, "mq_getsetattr": 245,
}
# Allowed only when the first argument is this process itself (kill(0) would hit the supervisor).
SELF_ONLY = {"kill": 62, "tgkill": 234}
# Allowed for this process itself, by its pid or as 0 (how glibc's setrlimit calls prlimit64).
SELF_OR_ZERO = {"prlimit64": 302, "sched_setaffinity": 203}
CLONE = 56
CLONE3 = 435  # its flags sit behind a pointer: ENOSYS makes glibc fall back to clone(2)
CLONE_THREAD = 0x00010000


def _seccomp_program(self_pid):
    """BPF: deny the calls above; clone only for threads; self-only calls checked on arg 0."""
    ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JSET|K, RET|K
    prog, fixups = [], []  # fixups: (index, true_label, false_label)

    def emit(code, k, jt=None, jf=None):
        prog.append([code, 0, 0, k])
        if jt is not None or jf is not None:
            fixups.append((len(prog) - 1, jt, jf))

    emit(ld, 4)  # seccomp_data.arch
    emit(jeq, AUDIT_ARCH_X86_64, None, "kill")
    emit(ld, 0)  # seccomp_data.nr
    emit(0x35, 0x40000000, "deny", None)  # JGE: the x32 ABI's numbers
    for nr in DENY.values():
        emit(jeq, nr, "deny", None)
    emit(jeq, CLONE3, "nosys", None)
    emit(jeq, CLONE, "clone", None)
    for nr in SELF_ONLY.values():
        emit(jeq, nr, "self", None)
    for nr in SELF_OR_ZERO.values():
        emit(jeq, nr, "self_or_zero", None)
    emit(ret, SECCOMP_RET_ALLOW)
    labels = {"clone": len(prog)}
    emit(ld, 16)  # args[0], low word: clone flags
    emit(jset, CLONE_THREAD, "allow", "deny")
    labels["self_or_zero"] = len(prog)
    emit(ld, 16)  # args[0], low word: the target pid
    emit(jeq, 0, "allow", None)
    emit(jeq, self_pid, "allow", "deny")
    labels["self"] = len(prog)
    emit(ld, 16)
    emit(jeq, self_pid, "allow", "deny")
    for name, value in (("allow", SECCOMP_RET_ALLOW), ("deny", SECCOMP_RET_ERRNO | EPERM),
                        ("nosys", SECCOMP_RET_ERRNO | ENOSYS), ("kill", SECCOMP_RET_KILL_PROCESS)):
        labels[name] = len(prog)
        emit(ret, value)
    for index, jt, jf in fixups:
        for slot, label in ((1, jt), (2, jf)):
            if label is not None:
                prog[index][slot] = labels[label] - index - 1
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


def _install_seccomp(self_pid):
    if os.uname().machine != "x86_64":
        raise OSError("no seccomp filter for " + os.uname().machine + ": refusing to run model code")
    libc = ctypes.CDLL(None, use_errno=True)
    code = _seccomp_program(self_pid)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("=HxxxxxxQ", len(code) // 8, ctypes.addressof(buf))
    fprog_buf = ctypes.create_string_buffer(fprog, len(fprog))
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog_buf), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp filter refused")


def _set_nondumpable():
    """Same-uid processes (other executions, in the pod also the server) cannot ptrace us or read
    our /proc files; and we cannot be made to dump."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


# --- limits ---------------------------------------------------------------------------------------
def _set_limit(which, soft, hard=None):
    """Lower a limit; raise if the kernel refuses (the worker then reports an error, runs nothing)."""
    hard = soft if hard is None else hard
    cur_soft, cur_hard = resource.getrlimit(which)
    if cur_hard != resource.RLIM_INFINITY:
        hard = min(hard, cur_hard)
        soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard))


def _vm_size_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu_used():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _apply_limits(limits):
    cpu = max(1, int(limits["cpu_s"] + 0.999))
    used = int(_cpu_used()) + 1
    _set_limit(resource.RLIMIT_CPU, used + cpu, used + cpu + 1)
    # The model's code may allocate memory_bytes on top of the interpreter and its preloads.
    _set_limit(resource.RLIMIT_AS, _vm_size_bytes() + int(limits["memory_bytes"]))
    _set_limit(resource.RLIMIT_NPROC, int(limits["pids"]))
    _set_limit(resource.RLIMIT_FSIZE, int(limits["file_bytes"]))
    _set_limit(resource.RLIMIT_NOFILE, 64)
    _set_limit(resource.RLIMIT_CORE, 0)


def _error_line(exc):
    """The last line of the traceback, e.g. "NameError: name 'x' is not defined" (traceback is
    imported only when there is an error to format; if the code broke importing or formatting, the
    exception's type name)."""
    try:
        import traceback

        lines = traceback.format_exception_only(type(exc), exc)
        return lines[-1].strip() if lines else type(exc).__name__
    except BaseException:
        return type(exc).__name__


# --- the two processes ----------------------------------------------------------------------------
def _worker(cells, limits, report_w, real_stdout, devnull):
    """Runs in the forked child; never returns."""
    try:
        os.dup2(devnull, 0)
        os.dup2(devnull, 2)
        _set_nondumpable()
        _install_seccomp(os.getpid())
        _apply_limits(limits)
    except BaseException as exc:
        os.write(report_w, _report_line("SandboxError: " + _error_line(exc)))
        os._exit(0)
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)  # the soft CPU limit ends the worker
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    stdout, stderr = sys.stdout, sys.stderr
    error = None
    for index, source in enumerate(cells):
        last = index == len(cells) - 1
        sys.stdout, sys.stderr = stdout, stderr
        try:
            stdout.flush()
        except BaseException:
            pass
        os.dup2(real_stdout if last else devnull, 1)
        try:
            code = compile(source, "<cell %d>" % index, "exec")
            exec(code, namespace)  # inside the sandbox, in the worker: this is where model code runs
        except SystemExit:
            cell_error = None
        except BaseException as exc:  # report, never propagate: the host wants the last line
            cell_error = _error_line(exc)
        else:
            cell_error = None
        try:
            sys.stdout.flush()
            stdout.flush()
        except BaseException:
            pass
        if last:
            error = cell_error
    try:
        os.write(report_w, _report_line(error))
    except BaseException:
        pass
    os._exit(0)


def _report_line(error):
    """The worker's report: "n" (no error) or "e" + hex of the error's UTF-8, one line."""
    return b"n\n" if error is None else b"e" + error.encode("utf-8", "replace").hex().encode() + b"\n"


def _read_report(fd):
    """The error of the worker's last well-formed report line (at most ERROR_REPORT_CAP bytes are
    read; the model's code could write lines of its own, as it could raise its own exception)."""
    data = b""
    while len(data) <= ERROR_REPORT_CAP:
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        data += chunk
    os.close(fd)
    if len(data) > ERROR_REPORT_CAP:
        return "SandboxError: the code wrote more than %d bytes to the error report" % ERROR_REPORT_CAP
    for line in reversed(data.splitlines()):
        if line == b"n":
            return None
        if line[:1] == b"e":
            try:
                return bytes.fromhex(line[1:].decode("ascii")).decode("utf-8", "replace")
            except ValueError:
                continue
    return None


def _json(value):
    """json.dumps(value) for the status: None, bools, ints, floats and strings (non-ASCII escaped)."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        out = []
        for ch in value:
            o = ord(ch)
            if ch == '"' or ch == "\\":
                out.append("\\" + ch)
            elif 0x20 <= o < 0x7F:
                out.append(ch)
            elif ch in _SHORT:
                out.append(_SHORT[ch])
            elif o > 0xFFFF:  # a surrogate pair, as json.dumps writes it
                o -= 0x10000
                out.append("\\u%04x\\u%04x" % (0xD800 | (o >> 10), 0xDC00 | (o & 0x3FF)))
            else:
                out.append("\\u%04x" % o)
        return '"' + "".join(out) + '"'
    if isinstance(value, dict):
        return "{" + ", ".join(_json(str(k)) + ": " + _json(v) for k, v in value.items()) + "}"
    raise TypeError("status values are None, bool, int, float, str or dict")


_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def _sweep(directories):
    """Empty the writable places after the worker is gone, so that a reused sandbox starts the next
    execution clean. A directory the code made unreadable (mkdir with mode 0) is opened up first.
    True only if every place is empty afterwards."""
    def remove(path):
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
            for name in os.listdir(path):
                remove(os.path.join(path, name))
            os.rmdir(path)
        else:
            os.unlink(path)

    try:
        for directory in directories:
            for name in os.listdir(directory):
                remove(os.path.join(directory, name))
        return all(not os.listdir(directory) for directory in directories)
    except Exception:  # noqa: BLE001 - e.g. a tree nested past the recursion limit: not reused
        return False


def _read_request(cap):
    """One request line from stdin (fd 0), read unbuffered: in a sandbox that serves many
    executions the same stream carries the next request later."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(0, 65536)
        if not chunk:
            break
        data += chunk
        if len(data) > cap:
            raise ValueError("the request is longer than %d bytes" % cap)
    return data


def _execute(limits, line, status_fd, real_stdout, devnull, end_marker):
    """Run one request (hex of marshal'd cells) in a forked worker and write its status line.

    With `end_marker` (a sandbox serving many executions, so stdout never reaches EOF between
    them), stdout gets b"\\0" + marker + b"\\n" after the worker is gone and the status carries the
    marker as "end": the host reads the output up to it. The marker comes from os.urandom after the
    worker has exited, so the model's code cannot have written it."""
    cells = marshal.loads(bytes.fromhex(line.strip().decode("ascii")))  # written by the host
    if isinstance(cells, dict):  # the pod: this execution's private directory, then the cells
        os.chdir(cells["cwd"])
        os.environ["HOME"] = os.environ["TMPDIR"] = cells["cwd"]
        cells = cells["cells"]
    if not isinstance(cells, list) or not all(isinstance(cell, str) for cell in cells):
        raise ValueError("the request must be a list of cells")
    loaded = 0  # bit i: this supervisor imported lazy module i (`_serve` then imports it for later forks)
    for i, name in enumerate(limits.get("lazy", ())):
        if name not in sys.modules and any(name in cell for cell in cells):
            try:
                __import__(name)
                loaded |= 1 << i
            except Exception:
                pass

    # A socketpair, not a pipe: inside gVisor a pipe can be reopened through /proc/<pid>/fd.
    report_r_sock, report_w_sock = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    report_r, report_w = report_r_sock.detach(), report_w_sock.detach()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    pid = os.fork()
    if pid == 0:
        os.close(status_fd)
        os.close(report_r)
        _worker(cells, limits, report_w, real_stdout, devnull)
    os.close(report_w)
    if not end_marker:
        os.close(real_stdout)  # the host sees stdout's EOF when the worker is gone
    os.write(status_fd, b"worker %d %d\n" % (pid, os.getpid()) + READY)
    error = _read_report(report_r)
    _, wait_status = os.waitpid(pid, 0)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (usage.ru_utime + usage.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    cpu_limit = max(1, int(limits["cpu_s"] + 0.999))
    signaled = os.WIFSIGNALED(wait_status)
    sig = os.WTERMSIG(wait_status) if signaled else 0
    timed_out = sig == signal.SIGXCPU or (signaled and cpu_s >= cpu_limit - 0.05)
    if timed_out:
        error = "TimeoutError: CPU time limit of %d s exceeded" % cpu_limit
    elif signaled:
        error = "SandboxError: the interpreter was killed by signal %d; memory or file size limit exceeded" % sig
    status = {"error": error, "timed_out": timed_out, "exit": -sig if signaled else os.WEXITSTATUS(wait_status),
              "cpu_s": round(cpu_s, 3), "swept": _sweep(limits.get("sweep", ()))}
    if end_marker:
        status["end"] = os.urandom(16).hex()
        os.write(real_stdout, b"\0" + status["end"].encode() + b"\n")
    os.write(status_fd, (_json(status) + "\n").encode())
    return loaded


def _serve(limits, status_fd, real_stdout, devnull):
    """Serve executions one after another (a reused gVisor sandbox): for each, fork a fresh
    supervisor that reads the next request and runs it as `_execute` does. This process never
    reads a request nor runs model code, so every supervisor (and its worker) starts from the same
    state, without paying for Python's start and imports again (under gVisor's ptrace platform a
    fork took ~13 ms of wall, a fresh `runsc exec` of Python ~95 ms). Ends at stdin's EOF.

    A `lazy` module that supervisors keep having to import (cells name it) is imported here too, so
    later forks have it: under gVisor's ptrace platform a cell importing sympy took ~1.1 s of CPU
    per execution, ~0.12 s with sympy loaded before the fork, while forking an interpreter that
    holds sympy costs ~65 ms more for every execution. So it pays once at least 1 in 16 executions
    use the module: it is imported here when it was needed twice and in at least 1/16 of the
    executions so far. The supervisor says which modules it imported by its exit status (64 + a bit
    per module); this process imports them itself, never the worker's copies, so nothing of an
    execution reaches the next."""
    cap = int(limits.get("max_request_bytes", 1 << 20))
    lazy = list(limits.get("lazy", ()))[:6]
    needed, served = [0] * len(lazy), 0
    while True:
        pid = os.fork()
        if pid == 0:
            try:
                line = _read_request(cap)
                if not line:
                    os._exit(3)
                loaded = _execute(limits, line, status_fd, real_stdout, devnull, end_marker=True)
            except BaseException as exc:
                os.write(status_fd, ("SandboxError: " + _error_line(exc) + "\n").encode("utf-8", "replace"))
                os._exit(1)
            os._exit(64 + (loaded & 63))
        _, wait_status = os.waitpid(pid, 0)
        code = os.WEXITSTATUS(wait_status) if os.WIFEXITED(wait_status) else 0
        if code == 3:
            return
        served += 1
        for i, name in enumerate(lazy):
            needed[i] += code >= 64 and (code - 64) >> i & 1
            if needed[i] >= 2 and 16 * needed[i] >= served and name not in sys.modules:
                try:
                    __import__(name)
                except Exception:
                    pass


def main(argv):
    limits = marshal.loads(bytes.fromhex(argv[1]))  # written by the host
    # Services start us with an empty environment; these knobs are set here, not inherited.
    for key, value in (("OPENBLAS_NUM_THREADS", "1"), ("OMP_NUM_THREADS", "1"), ("PYTHONHASHSEED", "0")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("HOME", os.getcwd())
    os.environ.setdefault("TMPDIR", os.getcwd())
    status_fd = os.dup(2)  # non-inheritable; the worker closes its copy before any model code
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 2)
    real_stdout = os.dup(1)
    os.dup2(devnull, 1)
    _set_nondumpable()

    for name in limits.get("preload", ()):
        try:
            __import__(name)
        except Exception:  # a missing optional module must not break the sandbox
            pass
    os.write(status_fd, READY)
    if limits.get("serve"):
        _serve(limits, status_fd, real_stdout, devnull)
        os._exit(0)
    line = sys.stdin.buffer.readline(int(limits.get("max_request_bytes", 1 << 20)))
    os.dup2(devnull, 0)
    _execute(limits, line, status_fd, real_stdout, devnull, end_marker=False)
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
