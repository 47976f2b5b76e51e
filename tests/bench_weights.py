"""How fast the decode step's matmuls can read the embedded model's weights on this CPU, per layout.

A decode step at a few rows is bound by reading the weights (issue 16: the engine's batch-1 step is
2.9x the bandwidth floor on an AVX2-only CPU, and llama.cpp reads 4.5-bit weights). This times the
trunk's 120 matmuls (30 layers of SmolLM2-135M: qkv 576->960, o 576->576, gate|up 576->3072,
down 1536->576; random weights, so nothing is cached between layers) five ways, at several rows:

  fp32         F.linear on the fp32 weight [out, in]: the engine's prefills on CPUs without native bf16
  fp32 [in,out] x @ W^T with W^T stored contiguous
  int8         weight-only int8 (per-output-channel scales), bf16 activations:
               torch.ops.aten._weight_int8pack_mm, what gpt-fast uses
  fp16         fp16 weights, fp32 activations: fbgemm's packed fp16 GEMM (torch.ops.quantized.linear_dynamic_fp16),
               the engine's decode steps there (alphamath/model/packed.py)
  int8 dyn.    int8 weights and activations quantised per call (7-bit, per tensor): fbgemm's
               torch.ops.quantized.linear_dynamic, what torch.ao's dynamic quantisation runs
Each format's error is reported too.

Best of 3 passes; nothing else should run beside it.

With --agreement K it also measures what the engine's fp16 decode weights (alphamath/model/packed.py)
change in the embedded model itself: the MCTS prompts of the first K GSM8K dev questions are fed one
token per step (decode steps, so fp16 where the CPU computes fp32) through the float and the fp16
forward, and their next-token distributions are compared at every position.

    python -m tests.bench_weights [--rows 1,5,15,40,120] [--agreement K] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

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


def agreement(k: int, data: str) -> dict:
    """Next-token distributions of the embedded model, float vs fp16 decode weights, token by token."""
    from transformers import DynamicCache

    from alphamath.data import load_problems
    from alphamath.model import ValueHeadModel, embedded_checkpoint
    from alphamath.model.fast_llama import FastLlama
    from alphamath.steps import render_prompt

    model = ValueHeadModel.from_pretrained(embedded_checkpoint(), dtype="fp32").eval()
    forwards = {w: FastLlama(model.lm, w) for w in ("float", "fp16")}
    top1 = kl = dlp = n = 0.0
    for p in load_problems(data, k):
        ids = model.tokenizer(render_prompt(p.question, model.tokenizer), return_tensors="pt", add_special_tokens=False).input_ids
        caches = {w: DynamicCache() for w in forwards}
        for t in range(ids.shape[1]):
            lp = {}
            for w, f in forwards.items():
                h, caches[w] = f.hidden(ids[:, t:t + 1], past_key_values=caches[w], position_ids=torch.tensor([[t]]))
                lp[w] = torch.log_softmax(f.logits(h)[0, -1].float(), -1)
            best = int(lp["float"].argmax())
            top1 += int(lp["fp16"].argmax()) == best
            kl += float((lp["float"].exp() * (lp["float"] - lp["fp16"])).sum())
            dlp += abs(float(lp["fp16"][best] - lp["float"][best]))
            n += 1
    out = {"positions": int(n), "top1_agreement": top1 / n, "mean_kl_float_fp16": kl / n,
           "mean_abs_dlogprob_of_float_top1": dlp / n}
    print(f"fp16 vs float decode weights, embedded model, {int(n)} positions of {k} GSM8K prompts: top-1 agreement "
          f"{out['top1_agreement']:.4f}, mean KL(float || fp16) {out['mean_kl_float_fp16']:.6f} nats, mean |d logprob| "
          f"of the float top-1 token {out['mean_abs_dlogprob_of_float_top1']:.4f}")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,5,15,40,120")
    p.add_argument("--agreement", type=int, default=0, help="GSM8K prompts to compare the embedded model on")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/gsm8k/dev.jsonl"))
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    ws = [torch.randn(o, i) for _ in range(LAYERS) for (o, i) in SHAPES]
    wts = [w.t().contiguous() for w in ws]
    quantized = [quantize(w) for w in ws]
    qs = [(q, s.to(torch.bfloat16)) for q, s in quantized]
    f16 = [torch.ops.quantized.linear_prepack_fp16(w, None) for w in ws]
    dyn = [torch.ops.quantized.linear_prepack(torch.quantize_per_channel(
        w, s.double(), torch.zeros(len(s), dtype=torch.long), 0, torch.qint8), None) for w, (_, s) in zip(ws, quantized)]
    mb = sum(w.numel() for w in ws) * 4 / 1e6
    out = {"weights_fp32_mb": round(mb, 1), "threads": torch.get_num_threads(), "rows": {}}
    print(f"{len(ws)} matmuls, {mb:.0f} MB of fp32 weights, {torch.get_num_threads()} threads")
    print("| rows | fp32 ms | fp32 [in,out] ms | int8 (bf16 act.) ms | fp16 (fbgemm) ms | int8 dyn. (fbgemm) ms | "
          "speedup over fp32: int8, fp16, int8 dyn. |")
    print("|---|---|---|---|---|---|---|")
    for m in (int(r) for r in a.rows.split(",")):
        x = {i: torch.randn(m, i) for i in (576, 1536)}
        xb = {i: v.to(torch.bfloat16) for i, v in x.items()}
        fp32 = best_of(lambda: [torch.nn.functional.linear(x[w.shape[1]], w) for w in ws])
        tr = best_of(lambda: [x[w.shape[0]] @ w for w in wts])
        i8 = best_of(lambda: [torch.ops.aten._weight_int8pack_mm(xb[q.shape[1]], q, s) for q, s in qs])
        h = best_of(lambda: [torch.ops.quantized.linear_dynamic_fp16(x[w.shape[1]], p) for w, p in zip(ws, f16)])
        d = best_of(lambda: [torch.ops.quantized.linear_dynamic(x[w.shape[1]], p, True) for w, p in zip(ws, dyn)])
        out["rows"][m] = {"fp32_ms": fp32 * 1e3, "fp32_transposed_ms": tr * 1e3, "int8_ms": i8 * 1e3,
                          "fp16_fbgemm_ms": h * 1e3, "int8_dynamic_fbgemm_ms": d * 1e3}
        print(f"| {m} | {fp32 * 1e3:.1f} | {tr * 1e3:.1f} | {i8 * 1e3:.1f} | {h * 1e3:.1f} | {d * 1e3:.1f} | "
              f"{fp32 / i8:.2f}, {fp32 / h:.2f}, {fp32 / d:.2f} |", flush=True)
    x = torch.randn(8, 576)
    ref = torch.cat([x @ w.t() for w in ws[:3]], 1)
    for name, fn in (("int8", lambda i: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), *qs[i]).float()),
                     ("fp16", lambda i: torch.ops.quantized.linear_dynamic_fp16(x, f16[i])),
                     ("int8_dynamic", lambda i: torch.ops.quantized.linear_dynamic(x, dyn[i], True))):
        got = torch.cat([fn(i) for i in range(3)], 1)
        out[f"{name}_max_rel_error"] = float((got - ref).abs().max() / ref.abs().max())
        print(f"{name} max error relative to the largest output: {out[f'{name}_max_rel_error']:.5f}")
    if a.agreement:
        out["agreement"] = agreement(a.agreement, a.data)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
