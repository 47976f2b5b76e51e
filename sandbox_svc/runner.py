"""The program that runs INSIDE the sandbox (gVisor or bubblewrap); never imported by a service.

It is passed to the sandboxed interpreter as `python3 -I -B -c <this source> <limits-json>`, so it
must use the standard library only and must not import anything from this repository.

Protocol with the host (`sandbox_svc.executor`):
  1. preload the configured modules (numpy, sympy: they dominate a cold cell's latency), then
     write "ready\\n" on the status channel (the original stderr);
  2. read one JSON line {"cells": [...]} from stdin; import those of the `lazy` modules (numpy,
     sympy: trusted system packages) that the cells name, then write "ready\\n" again: the host's
     wall clock for the model's code starts there, so a slow import (seconds under gVisor's
     ptrace platform on some hosts) is not charged to the code as if it were a runaway;
  3. tighten its own rlimits (CPU time counted from now, address space, processes, file size),
     run every cell in order in one namespace, the output of all but the last cell going to
     /dev/null (they only rebuild state), the last cell's output streaming to stdout, which the
     host reads with a hard cap;
  4. write one JSON status line {"error": str|null, "timed_out": bool} on the status channel and
     exit without running the model code's atexit handlers.
The model's own stderr goes to /dev/null so it cannot garble the status channel by accident.
A model that deliberately forges a status line only misreports its own result: containment does
not rely on this process (the sandbox and the host's timeouts/caps do).
"""
import json
import os
import resource
import signal
import sys
import traceback

READY = b"ready\n"


class CPUTimeLimitExceeded(Exception):
    """Raised on SIGXCPU (the soft RLIMIT_CPU); the hard limit one second later kills outright."""


def _on_sigxcpu(signum, frame):
    global _cpu_exceeded
    _cpu_exceeded = True
    raise CPUTimeLimitExceeded("CPU time limit exceeded")


_cpu_exceeded = False


def _set_limit(which, soft, hard=None):
    """Lower a limit; never raise (a limit the kernel refuses is still enforced by the sandbox)."""
    hard = soft if hard is None else hard
    try:
        cur_soft, cur_hard = resource.getrlimit(which)
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
            soft = min(soft, hard)
        resource.setrlimit(which, (soft, hard))
    except (ValueError, OSError):
        pass


def _vm_size_bytes():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _apply_limits(limits):
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = int(usage.ru_utime + usage.ru_stime) + 1
    cpu = max(1, int(limits["cpu_s"] + 0.999))
    signal.signal(signal.SIGXCPU, _on_sigxcpu)
    _set_limit(resource.RLIMIT_CPU, used + cpu, used + cpu + 1)
    # The model's code may allocate memory_bytes on top of the interpreter and its preloads.
    _set_limit(resource.RLIMIT_AS, _vm_size_bytes() + int(limits["memory_bytes"]))
    _set_limit(resource.RLIMIT_NPROC, int(limits["pids"]))
    _set_limit(resource.RLIMIT_FSIZE, int(limits["file_bytes"]))
    _set_limit(resource.RLIMIT_NOFILE, 64)
    _set_limit(resource.RLIMIT_CORE, 0)


def _error_line(exc):
    """The last line of the traceback, e.g. "NameError: name 'x' is not defined"."""
    lines = traceback.format_exception_only(type(exc), exc)
    return lines[-1].strip() if lines else type(exc).__name__


def main(argv):
    limits = json.loads(argv[1])
    status_fd = os.dup(2)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 2)
    real_stdout = os.dup(1)

    for name in limits.get("preload", ()):
        try:
            __import__(name)
        except Exception:  # a missing optional module must not break the sandbox
            pass
    os.write(status_fd, READY)

    line = sys.stdin.buffer.readline()
    os.dup2(devnull, 0)
    request = json.loads(line)
    cells = request["cells"]
    for name in limits.get("lazy", ()):
        if name not in sys.modules and any(name in cell for cell in cells):
            try:
                __import__(name)
            except Exception:
                pass
    os.write(status_fd, READY)

    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    stdout, stderr = sys.stdout, sys.stderr
    error = None
    _apply_limits(limits)
    for index, source in enumerate(cells):
        last = index == len(cells) - 1
        sys.stdout, sys.stderr = stdout, stderr
        try:
            stdout.flush()
        except Exception:
            pass
        os.dup2(real_stdout if last else devnull, 1)
        try:
            code = compile(source, "<cell %d>" % index, "exec")
            exec(code, namespace)  # inside the gVisor sandbox: this is where model code runs
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
    os.write(status_fd, (json.dumps({"error": error, "timed_out": _cpu_exceeded}) + "\n").encode())
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
