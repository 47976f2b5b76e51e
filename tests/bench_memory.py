"""The memory benchmark (issue 14): peak RSS of one process under the loads the budget must hold.

    python -m tests.bench_memory [--limit 16] [--out var/bench/memory.json]      (make bench-memory)

Each row is a fresh `alphamath eval` process on the hand-written held-out problems (the first
`--limit`; the concurrency is reached at once), so each peak is that load's own: SBS(3,5) at
concurrency 8 and 16, and MCTS(N=40, n=5) at concurrency 16, all on the embedded model. The
figure is the process's ru_maxrss (the CLI's `peak_rss_mb`), which is what the OOM killer and a
pod's memory limit see; the target is <= 6 GB per row. The engine's own budget
(ALPHAMATH_MEMORY_MB, see alphamath/lm/budget.py) is printed beside it. Results are written
after every row.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "handwritten" / "dev.jsonl"
ROWS = [
    ("SBS(3,5)", 8, ["--method", "sbs", "--b1", "3", "--b2", "5"]),
    ("SBS(3,5)", 16, ["--method", "sbs", "--b1", "3", "--b2", "5"]),
    ("MCTS(N=40, n=5)", 16, ["--method", "mcts", "--iterations", "40", "--n-children", "5"]),
]
TARGET_MB = 6 * 1024


def run_row(label: str, concurrency: int, args: list[str], limit: int, out_dir: Path) -> dict:
    out = out_dir / f"{label.split('(')[0].lower()}_c{concurrency}.json"
    cmd = [sys.executable, "-m", "app.cli", "eval", "--data", str(DATA), "--limit", str(limit),
           "--concurrency", str(concurrency), "--json-out", str(out), *args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{label} at concurrency {concurrency} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    (report,) = json.loads(out.read_text())  # one method, one row
    return {"load": label, "concurrency": concurrency, "problems": limit, "wall_s": round(wall, 1),
            "correct": report["correct"], "peak_rss_mb": report["peak_rss_mb"],
            "memory_budget_mb": report["memory_budget_mb"], "within_target": report["peak_rss_mb"] <= TARGET_MB}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=16, help="problems per row (>= the largest concurrency)")
    ap.add_argument("--out", default=str(ROOT / "var" / "bench" / "memory.json"))
    ap.add_argument("--rows", default="0,1,2", help="which rows to run (indices into the table)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"| load | concurrency | peak RSS (GB) | target | engine budget (MB) | wall (s) |  "
          f"[ALPHAMATH_MEMORY_MB={os.environ.get('ALPHAMATH_MEMORY_MB', 'default')}]")
    print("|---|---|---|---|---|---|")
    for i in (int(x) for x in a.rows.split(",")):
        label, conc, args = ROWS[i]
        row = run_row(label, conc, args, a.limit, out.parent)
        rows.append(row)
        out.write_text(json.dumps({"rows": rows, "target_mb": TARGET_MB}, indent=1))  # results as they come
        print(f"| {label} | {conc} | {row['peak_rss_mb'] / 1024:.2f} | <= {TARGET_MB / 1024:.0f} "
              f"{'met' if row['within_target'] else 'MISSED'} | {row['memory_budget_mb']} | {row['wall_s']} |", flush=True)
    return 0 if all(r["within_target"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
