"""`python -m sandbox_svc`: SandboxService (gRPC) over the local sandbox executor, and metrics.

    python -m sandbox_svc --backend runsc --pool-size 2   # on a host; in the gVisor pod: --backend pod
Every flag can be set as ALPHAMATH_SANDBOX_<FLAG> or ALPHAMATH_<FLAG> (see --help). Inside a gVisor
pod the process first re-executes itself with its configuration as flags and an empty environment.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from alphamath.service import parse_config, run_until_signal, service_parser, setup_logging

log = logging.getLogger("sandbox_svc")


def build_parser():
    p = service_parser("sandbox", "SandboxService: runs model-written Python in gVisor sandboxes.")
    p.add_argument("--backend", default="auto", choices=["auto", "pod", "runsc", "bwrap"],
                   help="sandbox backend: pod (inside a gVisor pod), runsc (gVisor on a host), bwrap (weaker, "
                        "needs --allow-weak-backend); auto picks pod or runsc, never a weaker one")
    p.add_argument("--allow-weak-backend", action="store_true",
                   help="allow a backend weaker than gVisor (bwrap); off in production")
    p.add_argument("--uds", default="", help="also listen on this Unix socket path")
    p.add_argument("--scratch-dir", default="", help="pod backend: where per-execution scratch directories go")
    p.add_argument("--preload", default="",
                   help="modules pooled sandboxes import ahead of their request (comma-separated; '' for none)")
    p.add_argument("--environment-scrubbed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--max-concurrency", type=int, default=4, help="sandboxes running at once")
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting; beyond this RESOURCE_EXHAUSTED")
    p.add_argument("--pool-size", type=int, default=2, help="sandboxes booted ahead of time (warm pool)")
    p.add_argument("--timeout-s", type=float, default=5.0, help="wall-clock limit per execution (server maximum)")
    p.add_argument("--memory-mb", type=int, default=256, help="memory limit per execution (server maximum)")
    p.add_argument("--max-output-chars", type=int, default=1024, help="stdout kept per execution (server maximum)")
    p.add_argument("--max-code-bytes", type=int, default=64 << 10, help="largest accepted code (all cells)")
    return p


def _reexec_without_environment(p: argparse.ArgumentParser, args: argparse.Namespace):
    """Restart this process with its configuration as flags and an EMPTY environment.

    In the pod the model's code runs as our uid, and gVisor lets it read /proc/<our pid>/environ
    (even of a non-dumpable process): nothing of the pod's environment may be left there."""
    argv = [sys.executable, "-I", "-u", "-B", "-m", "sandbox_svc"]  # -I: no cwd on the import path
    for action in p._actions:
        if not action.option_strings or action.dest in ("help", "_service", "environment_scrubbed"):
            continue
        value = getattr(args, action.dest)
        if isinstance(action, argparse._StoreTrueAction):
            argv += [action.option_strings[0]] if value else []
        elif value is not None:
            argv += [action.option_strings[0], str(value)]
    os.execve(sys.executable, [*argv, "--environment-scrubbed"], {})


def main(argv=None) -> int:
    p = build_parser()
    args = parse_config(p, argv)
    from alphamath.sandbox.executor import running_in_gvisor

    pod = args.backend == "pod" or (args.backend == "auto" and running_in_gvisor())
    if pod and os.environ and not args.environment_scrubbed:
        _reexec_without_environment(p, args)
    setup_logging("sandbox", args.log_level)
    if args.max_concurrency < 1 or args.max_queue < 0:
        raise SystemExit("--max-concurrency must be >= 1 and --max-queue >= 0")
    from alphamath.sandbox.executor import STRONG_BACKENDS, Executor
    from sandbox_svc.server import SandboxServer

    executor = Executor(memory_mb=args.memory_mb, timeout_s=args.timeout_s, max_output_bytes=args.max_output_chars,
                        max_code_bytes=args.max_code_bytes, backend=args.backend, allow_weak=args.allow_weak_backend,
                        pool_size=args.pool_size, scratch_dir=args.scratch_dir or None,
                        preload=tuple(m for m in args.preload.split(",") if m) if args.pool_size else ())
    server = SandboxServer(executor, port=args.port, host=args.host, metrics_port=args.metrics_port,
                           max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                           max_workers=args.max_workers, own_executor=True, uds=args.uds or None)
    if args.uds and executor.backend == "pod":
        # Model code runs as our uid: it must not replace or remove the socket clients connect to
        # (and cannot chmod the directory back: the runner's seccomp filter denies chmod).
        os.chmod(os.path.dirname(os.path.abspath(args.uds)), 0o555)
    level = logging.INFO if executor.backend in STRONG_BACKENDS else logging.WARNING
    log.log(level, "sandbox service ready, backend %s (%s)", executor.backend, executor.strength,
            extra={"port": server.port, "metrics_port": server.metrics_port, "backend": executor.backend,
                   "strength": executor.strength, "pool_size": executor.pool_size})
    run_until_signal(server.stop, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
