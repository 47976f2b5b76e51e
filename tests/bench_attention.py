"""Decode attention of one step, the prompts held whole against a root held once (kv.py's _Batch root).

    python -m tests.bench_attention [--prompts 16] [--rows 3] [--root 352] [--suffix 68]

A step of `prompts` x `rows` query rows over 30 layers, each layer with its own prompt KV (as a real step
reads them: from memory, not from cache; one layer's KV reused 30 times read 7.1 ms where 30 layers'
read 12.4, s43), 32 own columns in use per row. "whole": every prompt's slot holds root + suffix, as
before session 43; "root": the root's tiles once, each slot its suffix. The two alternate, 4 rounds,
and the median step of each is printed. decode.cpp's AMX path where it runs, else (or with
ALPHAMATH_DECODE_MATMUL=pairs) its vdpbf16ps path, which transposes each slot's keys every step.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

LAYERS, HEADS, GROUP, D, OWN = 30, 3, 3, 64, 64  # SmolLM2-135M: 3 KV heads, 9 query heads, head size 64


def build(prompts: int, rows: int, root: int, suffix: int, held_root: bool):
    """One step's decode_attention arguments per layer, random bf16."""
    from alphamath.model import decode

    bf, B = torch.bfloat16, prompts * rows
    q = torch.randn(B, HEADS, GROUP, D).to(bf)
    valid = torch.zeros(B, OWN, dtype=torch.bool)
    valid[:, :32] = True
    group_of = torch.arange(B) // rows
    n = suffix if held_root else root + suffix
    tiles = decode.tiles_on()
    cols = -(-n // 32) * 32
    layers = []
    for _ in range(LAYERS):
        pk, pv = (torch.randn(prompts, HEADS, cols, D).to(bf) for _ in range(2))
        own_k, own_v = (torch.randn(B, HEADS, OWN, D).to(bf) for _ in range(2))
        root_args = None
        if held_root:
            rk, rv = (torch.randn(HEADS, root, D).to(bf) for _ in range(2))
            Lr = -(-root // 32) * 32
            kt, vt = rk.new_empty(HEADS, D // 2, Lr, 2), rk.new_empty(HEADS, Lr // 2, D, 2)
            decode.lay_tiles(rk, rv, kt, vt)
            root_args = (kt, vt, torch.full((prompts,), root))
        layers.append((q, own_k, own_v, valid, pk, pv, torch.full((prompts,), n), group_of, D ** -0.5,
                       decode.prompt_tiles(pk, pv) if tiles else None, None, root_args))
    return layers


def step_ms(layers, repeats: int = 9) -> float:
    from alphamath.model import decode

    def step():
        for args in layers:
            decode.decode_attention(*args)

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--rows", type=int, default=3, help="rows per prompt")
    ap.add_argument("--root", type=int, default=352, help="tokens of the shared prefix")
    ap.add_argument("--suffix", type=int, default=68, help="tokens of each prompt past the root")
    a = ap.parse_args(argv)
    from alphamath.model import decode
    if decode.kernel() is None:
        print("decode.cpp does not run here (it needs AVX512-BF16): nothing to measure")
        return 1
    torch.manual_seed(0)
    whole = build(a.prompts, a.rows, a.root, a.suffix, False)
    rooted = build(a.prompts, a.rows, a.root, a.suffix, True)
    got = {"whole": [], "root": []}
    for _ in range(4):
        got["whole"].append(round(step_ms(whole), 2))
        got["root"].append(round(step_ms(rooted), 2))
    w, r = statistics.median(got["whole"]), statistics.median(got["root"])
    print(f"{'AMX tiles' if decode.tiles_on() else 'vdpbf16ps pairs'}: {a.prompts} prompts x {a.rows} rows, {a.root} + {a.suffix} prompt tokens, {LAYERS} layers: "
          f"whole {w:.2f} ms, root {r:.2f} ms per step ({w / r:.2f}x); rounds whole {got['whole']}, "
          f"root {got['root']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
