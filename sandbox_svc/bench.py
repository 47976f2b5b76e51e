"""Sandbox latency per execution (p50/p95): `python -m sandbox_svc.bench --backend runsc -n 30`.

Each execution is a two-cell path (state rebuilt, last cell printed), the typical MCTS request.
`--pool` keeps that many sandboxes booted ahead; `--gap` idles between requests the way search
does while the policy generates the next step (which is what lets the pool refill).
"""
from __future__ import annotations

import argparse
import statistics
import time

from sandbox_svc.executor import Executor


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backend", default="auto", choices=("auto", "runsc", "bwrap"))
    ap.add_argument("-n", type=int, default=30)
    ap.add_argument("--pool", type=int, default=0)
    ap.add_argument("--gap", type=float, default=0.0, help="seconds idle between executions")
    ap.add_argument("--sympy", action="store_true", help="cells import sympy (cold import cost)")
    args = ap.parse_args()
    cells = ["x = 20", "import sympy\nprint(sympy.sqrt(x))" if args.sympy else "print(x + 1)"]
    with Executor(backend=args.backend, pool_size=args.pool) as ex:
        if args.pool:
            time.sleep(max(args.gap, 2.0) * args.pool)  # let the pool fill once
        latencies = []
        for _ in range(args.n):
            t0 = time.monotonic()
            result = ex.execute(cells)
            latencies.append(time.monotonic() - t0)
            if result.error or not result.stdout:
                raise SystemExit(f"unexpected result {result}")
            time.sleep(args.gap)
        print(
            f"backend={ex.backend} pool={args.pool} gap={args.gap}s sympy={args.sympy} n={args.n} "
            f"p50={percentile(latencies, 0.5) * 1000:.0f}ms p95={percentile(latencies, 0.95) * 1000:.0f}ms "
            f"mean={statistics.mean(latencies) * 1000:.0f}ms"
        )


if __name__ == "__main__":
    main()
