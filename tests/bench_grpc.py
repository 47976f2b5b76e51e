"""gRPC stack vs in-process engine: problems per minute, side by side (part of `make bench`).

    python -m tests.bench_grpc [--limit-scale 1.0]

Measures, with the embedded checkpoint and small step-level beam search settings:
  * the in-process engine (one LocalLM shared by policy and value, the gVisor executor with the
    same warm pool as the sandbox service) solving problems one after another;
  * the local stack (policy, value, sandbox, search as processes on loopback) at 1, 4 and 16
    concurrent Solve calls.
Every configuration solves the same first problems of gsm8k dev with the same seeds. At concurrency 1
the two paths alternate problem by problem, so that load from other processes on the machine
affects both alike (the answers are compared; bf16 numerics of a shared vs. separate policy/value
model can differ, so a mismatch is reported, not an error). Targets (issue 3): the gRPC path costs at most 10% over in-process at
concurrency 1, and throughput at 16 is at least 3x that at 1 (cross-request batching).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "gsm8k" / "dev.jsonl"
METHOD = "sbs"
PARAMS = dict(beam_b1=1, beam_b2=3, max_new_tokens=64, max_depth=4)
PROBLEMS = {1: 16, 4: 16, 16: 16}  # problems solved at each concurrency: the same ones, so ratios compare like with like


class InProcess:
    """The in-process engine: one LocalLM shared by policy and value, the gVisor executor with
    the same warm pool as the sandbox service."""

    def __init__(self, model_dir):
        from alphamath.lm import LocalLM
        from policy_svc.local import LocalPolicy
        from sandbox_svc.executor import Executor
        from search_svc.config import SearchConfig
        from value_svc.local import LocalValue

        lm = LocalLM(model_dir)
        self.policy, self.value = LocalPolicy(lm), LocalValue(lm)
        self.cfg = SearchConfig(**PARAMS)
        self.sandbox = Executor(backend="runsc", pool_size=2)

    def solve(self, p) -> tuple[float, str | None]:
        from search_svc.engine import solve

        start = time.perf_counter()
        tree = solve(p.question, METHOD, self.policy, self.value, self.sandbox, self.cfg,
                     ground_truth=p.answer, question_id=p.id)
        return time.perf_counter() - start, tree.meta.get("answer")

    def close(self):
        self.sandbox.close()


def through_grpc(addr: str, problems, concurrency: int) -> tuple[float, list]:
    from alphamath.client import solve

    def one(p):
        return solve(addr, p.question, METHOD, PARAMS, timeout_s=1800, ground_truth=p.answer, question_id=p.id)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, problems))
    return time.perf_counter() - start, [r.answer if r.HasField("answer") else None for r in results]


def run(report=None, *, scale: float = 1.0, model_dir: str | None = None) -> dict:
    """Run the comparison and print a table. `report`, if given, receives every figure: either a
    callable `report(name, value)` or a dict (figures are stored under their names)."""
    from alphamath.data import load_problems
    from alphamath.model import embedded_checkpoint
    from alphamath.stack import SERVICES, LocalStack, Ports, free_ports

    counts = {c: max(1, round(n * scale)) for c, n in PROBLEMS.items()}
    problems = load_problems(DATA, max(counts.values()))
    model_dir = Path(model_dir) if model_dir else Path(embedded_checkpoint())
    out: dict[str, float] = {}

    inproc = InProcess(model_dir)
    p = free_ports(2 * len(SERVICES) + 1)
    ports = Ports(dict(zip(SERVICES, p[:4])), dict(zip(SERVICES, p[4:8])), http=p[8])
    with tempfile.TemporaryDirectory(prefix="alphamath-bench-") as var:
        stack = LocalStack(var, ports=ports, model_dir=model_dir,
                           env={"ALPHAMATH_SANDBOX_POOL_SIZE": "2", "ALPHAMATH_LOG_LEVEL": "WARNING"})
        try:
            stack.start(timeout_s=600)
            addr = ports.addr("search")
            through_grpc(addr, problems[:1], 1)  # warm-up both paths: first-call costs (caches, pools)
            inproc.solve(problems[0])
            # Concurrency 1, interleaved problem by problem so that load from other processes on
            # this machine hits both paths alike.
            t_in = t_grpc = 0.0
            same = True
            for prob in problems[: counts[1]]:
                secs, a_in = inproc.solve(prob)
                t_in += secs
                secs_g, (a_g,) = through_grpc(addr, [prob], 1)
                t_grpc += secs_g
                same &= a_in == a_g
                print(f"  {prob.id}: in-process {secs:6.1f} s   gRPC {secs_g:6.1f} s", file=sys.stderr)
            out["inproc_c1_ppm"] = counts[1] / t_in * 60
            out["grpc_c1_ppm"] = counts[1] / t_grpc * 60
            out["same_answers_c1"] = float(same)
            for c in (4, 16):
                secs, _ = through_grpc(addr, problems[: counts[c]], c)
                out[f"grpc_c{c}_ppm"] = counts[c] / secs * 60
                print(f"  concurrency {c}: {counts[c]} problems in {secs:.1f} s", file=sys.stderr)
        finally:
            stack.stop()
            inproc.close()

    out["grpc_overhead_c1"] = out["inproc_c1_ppm"] / out["grpc_c1_ppm"] - 1
    out["grpc_speedup_c16_over_c1"] = out["grpc_c16_ppm"] / out["grpc_c1_ppm"]
    print(f"\n== gRPC stack vs in-process ({METHOD} {PARAMS}, gsm8k dev) ==")
    print(f"{'path':28s} {'concurrency':>11s} {'problems':>8s} {'problems/min':>13s}")
    print(f"{'in-process engine':28s} {1:>11d} {counts[1]:>8d} {out['inproc_c1_ppm']:>13.2f}")
    for c in (1, 4, 16):
        print(f"{'gRPC stack':28s} {c:>11d} {counts[c]:>8d} {out[f'grpc_c{c}_ppm']:>13.2f}")
    ok1 = out["grpc_overhead_c1"] <= 0.10
    ok16 = out["grpc_speedup_c16_over_c1"] >= 3.0
    print(f"gRPC overhead at concurrency 1: {out['grpc_overhead_c1'] * 100:+.1f}%  (target <= +10%: "
          f"{'met' if ok1 else 'NOT met'}); same answers as in-process: {bool(out['same_answers_c1'])}")
    print(f"throughput 16 vs 1: {out['grpc_speedup_c16_over_c1']:.2f}x  (target >= 3x: {'met' if ok16 else 'NOT met'})")
    for k, v in out.items():
        if callable(report):
            report(k, v)
        elif isinstance(report, dict):
            report[k] = v
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the number of problems per level")
    ap.add_argument("--model-dir", default=None, help="HF checkpoint (default: the embedded SmolLM2)")
    a = ap.parse_args(argv)
    run(scale=a.scale, model_dir=a.model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
