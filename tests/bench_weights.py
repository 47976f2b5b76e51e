"""How fast the decode step's matmuls can read the embedded model's weights on this CPU, per layout.

A decode step at a few rows is bound by reading the weights (issue 16: the engine's batch-1 step is
2.9x the bandwidth floor on an AVX2-only CPU, and llama.cpp reads 4.5-bit weights). This times the
trunk's 120 matmuls (30 layers of SmolLM2-135M: qkv 576->960, o 576->576, gate|up 576->3072,
down 1536->576; random weights, so nothing is cached between layers) three ways, at several rows:

  fp32         F.linear on the fp32 weight [out, in]: the engine on CPUs without native bf16
  fp32 [in,out] x @ W^T with W^T stored contiguous
  int8         weight-only int8 (per-output-channel scales), bf16 activations:
               torch.ops.aten._weight_int8pack_mm, what gpt-fast uses; its error is reported too

Best of 3 passes; nothing else should run beside it.

    python -m tests.bench_weights [--rows 1,5,15,40,120] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) per layer of SmolLM2-135M
LAYERS = 30


def best_of(fn, passes: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w ~= q * scale[:, None]."""
    scale = w.abs().amax(1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).to(torch.int8).contiguous(), scale


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,5,15,40,120")
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    ws = [torch.randn(o, i) for _ in range(LAYERS) for (o, i) in SHAPES]
    wts = [w.t().contiguous() for w in ws]
    qs = [(q, s.to(torch.bfloat16)) for q, s in map(quantize, ws)]
    mb = sum(w.numel() for w in ws) * 4 / 1e6
    out = {"weights_fp32_mb": round(mb, 1), "threads": torch.get_num_threads(), "rows": {}}
    print(f"{len(ws)} matmuls, {mb:.0f} MB of fp32 weights, {torch.get_num_threads()} threads")
    print("| rows | fp32 ms | fp32 [in,out] ms | int8 (bf16 act.) ms | int8 speedup over fp32 |")
    print("|---|---|---|---|---|")
    for m in (int(r) for r in a.rows.split(",")):
        x = {i: torch.randn(m, i) for i in (576, 1536)}
        xb = {i: v.to(torch.bfloat16) for i, v in x.items()}
        fp32 = best_of(lambda: [torch.nn.functional.linear(x[w.shape[1]], w) for w in ws])
        tr = best_of(lambda: [x[w.shape[0]] @ w for w in wts])
        i8 = best_of(lambda: [torch.ops.aten._weight_int8pack_mm(xb[q.shape[1]], q, s) for q, s in qs])
        out["rows"][m] = {"fp32_ms": fp32 * 1e3, "fp32_transposed_ms": tr * 1e3, "int8_ms": i8 * 1e3}
        print(f"| {m} | {fp32 * 1e3:.1f} | {tr * 1e3:.1f} | {i8 * 1e3:.1f} | {fp32 / i8:.2f} |", flush=True)
    x = torch.randn(8, 576)
    ref = torch.cat([x @ w.t() for w in ws[:3]], 1)
    got = torch.cat([torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, s).float() for q, s in qs[:3]], 1)
    out["int8_max_rel_error"] = float((got - ref).abs().max() / ref.abs().max())
    print(f"int8 max error relative to the largest output: {out['int8_max_rel_error']:.4f}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
