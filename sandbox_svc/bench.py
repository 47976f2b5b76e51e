"""Sandbox latency per execution, p50/p95, for each backend, cold and with a warm pool.

    python -m sandbox_svc.bench                      # pod, runsc, bwrap; -n 30 each
    python -m sandbox_svc.bench --backends pod -n 50 --gap 1.0

cold: no pool, every execution boots its sandbox on the request path. warm: `--pool` sandboxes
booted ahead (`--preload` modules imported; none by default); `--gap` idles between requests the way search does while
the policy writes the next step, which is what lets the pool refill. `pod` is measured as
production sees it: the service inside a pod-shaped gVisor sandbox (sandbox_svc.podsim), called
over gRPC from outside; runsc and bwrap are in-process executors. The cell is `print(6 * 7)`
(`--cells path` for a two-cell path that rebuilds state first). Needs root and runsc.

`cpu ms` is the whole machine's busy CPU time per execution while measuring (/proc/stat: the
sandbox's, gVisor's and the caller's), the cost that competes with the model on a small host.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

CELLS = {"print": ["print(6 * 7)"], "path": ["x = 20", "y = x * 2", "print(x + y + 2)"]}
EXPECTED = {"print": "42\n", "path": "62\n"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def machine_busy_s() -> float:
    """Seconds of CPU the whole machine has spent busy (not idle or waiting on I/O) since boot."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def measure(execute, cells, expected, n: int, gap: float) -> tuple[list[float], float]:
    """(latency of each execution, machine CPU seconds per execution)."""
    latencies = []
    busy = machine_busy_s()
    for _ in range(n):
        t0 = time.monotonic()
        result = execute(cells)
        latencies.append(time.monotonic() - t0)
        if result.error or result.stdout != expected:
            raise SystemExit(f"unexpected result {result}")
        time.sleep(gap)
    return latencies, (machine_busy_s() - busy) / n


def run(backend: str, pool: int, cells, expected, n: int, gap: float, preload: str) -> tuple[list[float], float]:
    if backend == "pod":
        from sandbox_svc.podsim import PodSandbox, remote_execute

        with PodSandbox(pool_size=pool, extra_args=("--preload", preload)) as pod, pod.channel() as ch:
            execute = remote_execute(ch)
            execute(cells)  # the first call also sets up the gRPC connection
            time.sleep(max(gap, 3.0) * pool)  # let the pool fill once
            return measure(execute, cells, expected, n, gap)
    from alphamath.sandbox.executor import WEAK_BACKENDS, Executor

    with Executor(backend=backend, allow_weak=backend in WEAK_BACKENDS, pool_size=pool,
                  preload=tuple(m for m in preload.split(",") if m) if pool else ()) as ex:
        time.sleep(max(gap, 3.0) * pool)
        return measure(ex.execute, cells, expected, n, gap)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="pod,runsc,bwrap")
    ap.add_argument("-n", type=int, default=30)
    ap.add_argument("--pool", type=int, default=2, help="warm pool size")
    ap.add_argument("--gap", type=float, default=1.0, help="seconds idle between warm executions")
    ap.add_argument("--cells", choices=sorted(CELLS), default="print")
    ap.add_argument("--preload", default="", help="what pooled sandboxes import ahead ('' for nothing)")
    args = ap.parse_args()
    print(f"cells={args.cells} n={args.n} warm: pool={args.pool} gap={args.gap}s preload={args.preload!r}")
    print(f"{'backend':<8} {'mode':<5} {'p50 ms':>7} {'p95 ms':>7} {'mean ms':>8} {'cpu ms':>7}")
    for backend in args.backends.split(","):
        for mode, pool, gap in (("cold", 0, 0.0), ("warm", args.pool, args.gap)):
            lat, cpu = run(backend, pool, CELLS[args.cells], EXPECTED[args.cells], args.n, gap, args.preload)
            print(f"{backend:<8} {mode:<5} {percentile(lat, 0.5) * 1000:>7.0f} {percentile(lat, 0.95) * 1000:>7.0f} "
                  f"{statistics.mean(lat) * 1000:>8.0f} {cpu * 1000:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
