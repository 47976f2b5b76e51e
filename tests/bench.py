"""`make bench`: the engine against what a user would run instead, measured side by side in one run.

1. llama.cpp vs the engine on one rendered MCTS prompt (embedded model: the GGUF for llama.cpp, its
   HF conversion for the engine): prefill tokens/s, decode tokens/s at batch 1 and for n continuations
   of the prompt, the same fixed number of tokens on both sides (tests/bench_llamacpp.py; llama.cpp
   runs in a child process, so its peak RSS is its own). The engine's ratios are one token per row
   and step, as llama.cpp decodes here; its rates with drafts (lm/lookup.py) stand beside them.
2. MCTS, engine vs baseline (a), HF transformers: each problem is searched with the prefix-cached
   engine (policy and value share one LocalLM) while every model call is recorded (untimed: a
   warm-up of both paths). Then the same search runs with baseline (a) as policy and value, and
   again with the engine, both timed. In baseline (a) each expansion is one
   `generate(num_return_sequences=n, output_scores=True)` on the re-encoded state, with the
   per-token log-probs computed, each scoring call one padded forward. Baseline (a) returns the
   engine's recorded samples and values, so it builds exactly the same tree (checked) and does
   the same sandbox and search work; its `generate` decodes as many tokens as the longest recorded
   sample. Both wall times are measured.
   Token ratio: tokens the model computed / tokens the search needed (alphamath.accounting: the
   token trie of the prompt, every sample's fed tokens, the scored states and the expanded
   prefixes, plus the fed tokens of samples the tree merged because an identical step was already
   there); beside it the stricter ratio to distinct positions (siblings' identical first tokens once),
   and the ratio without the positions fed draft tokens the samples did not draw (lm/lookup.py:
   computed on purpose, in steps whose extra rows cost little). The engine also searches each problem with drafts off
   (ALPHAMATH_DRAFTS=0), timed, so what the drafts moved is measured in the same run.
3. The engine searching the problems at once (solve_many, decode batches shared between searches).
4. The gRPC stack vs the in-process engine, like for like (tests/bench_grpc.py).
Every row carries the peak RSS of the process that produced it (ru_maxrss, so far).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from alphamath.accounting import scored_nodes, token_counts, token_ratio
from alphamath.data import load_problems
from alphamath.runtime import peak_rss_mb
from alphamath.tree import Tree

ROOT = Path(__file__).resolve().parents[1]


class Recorder:
    """Wraps the engine's policy and value: records every call with its result, and the model seconds."""

    def __init__(self, policy, value):
        self.policy, self.value, self.calls, self.model_s = policy, value, [], 0.0

    def render_prompt(self, question):
        return self.policy.render_prompt(question)

    def generate(self, prompts, n, **kw):
        t0 = time.perf_counter()
        out = self.policy.generate(prompts, n, **kw)
        self.model_s += time.perf_counter() - t0
        self.calls.append(("generate", list(prompts), n, out))
        return out

    def score(self, states):
        t0 = time.perf_counter()
        out = self.value.score(states)
        self.model_s += time.perf_counter() - t0
        self.calls.append(("score", list(states), None, out))
        return out


class Diverged(RuntimeError):
    """The baseline's search asked for something the engine's search did not: trees would differ."""


class HFReplay:
    """Baseline (a), what a transformers user writes: per expansion one `generate` with
    num_return_sequences=n on the re-encoded state, scores returned and turned into per-token
    log-probs; per scoring call one padded forward read by the value head. It returns the engine's
    recorded results, so the search (and the sandbox work) is the same; it computes as many tokens
    as the longest recorded sample of each prompt (min_new_tokens = max_new_tokens = that length)."""

    def __init__(self, lm, calls):
        from alphamath.local import LocalPolicy

        self.model, self.tokenizer = lm.model, lm.tokenizer
        self.render = LocalPolicy(lm).render_prompt  # the engine's prompt, so the trees can match
        self.calls, self.i = calls, 0
        self.computed, self.model_s = 0, 0.0

    def render_prompt(self, question):
        return self.render(question)

    def _next(self, kind, inputs):
        if self.i >= len(self.calls):
            raise Diverged(f"call {self.i}: the engine's search made no more calls")
        got_kind, want, n, out = self.calls[self.i]
        if got_kind != kind or want != list(inputs):
            raise Diverged(f"call {self.i}: {kind} of {len(inputs)} texts, the engine's was {got_kind} of {len(want)}")
        self.i += 1
        return n, out

    def _ids(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, prompts, n, *, stop, temperature, top_p=1.0, max_new_tokens=256, seed=None):
        import torch

        _, out = self._next("generate", prompts)
        lm = self.model.lm
        t0 = time.perf_counter()
        with torch.inference_mode():
            for prompt, samples in zip(prompts, out):
                ids = torch.tensor([self._ids(prompt)])
                length = max(s.token_count for s in samples)
                sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
                    dict(do_sample=False)
                if seed is not None:
                    torch.manual_seed(seed)
                res = lm.generate(ids, attention_mask=torch.ones_like(ids), num_return_sequences=n,
                                  max_new_tokens=length, min_new_tokens=length, output_scores=True,
                                  return_dict_in_generate=True, pad_token_id=self.tokenizer.eos_token_id, **sampling)
                lm.compute_transition_scores(res.sequences, res.scores, normalize_logits=True).sum(-1)
                self.computed += n * ids.shape[1] + n * (length - 1)  # the prompt is expanded n times
        self.model_s += time.perf_counter() - t0
        return out

    def score(self, states):
        import torch

        _, out = self._next("score", states)
        t0 = time.perf_counter()
        rows = [self._ids(s) for s in states]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: the last position is every row's last token
            ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        with torch.inference_mode():
            h, _ = self.model.hidden(ids, attention_mask=mask, position_ids=pos)
            self.model.values_from_hidden(h[:, -1])
        self.computed += ids.numel()
        self.model_s += time.perf_counter() - t0
        return out


def shape(tree: Tree) -> list[tuple]:
    """What makes two trees the same search: each node's parent, step, visits and value sum."""
    return [(n.parent, n.text, n.kind, n.code, n.N, round(n.W, 9)) for n in tree.nodes]


def mcts_vs_hf(args, lm, sandbox, problems) -> dict:
    from alphamath.local import LocalPolicy, LocalValue
    from alphamath.search_config import SearchConfig
    from search_svc.engine import solve, solve_many

    cfg = SearchConfig(iterations=args.iterations, n_children=args.n_children, max_new_tokens=args.max_new_tokens,
                       max_depth=args.max_depth, leaves_per_call=args.leaves_per_call, c_puct=args.c_puct)
    print(f"\nMCTS engine vs baseline (a) HF generate: {len(problems)} problems, N={cfg.iterations}, "
          f"{cfg.leaves_per_call} leaves per model call, c_puct {cfg.c_puct}, "
          f"n={cfg.n_children}, max_new_tokens {cfg.max_new_tokens}, depth {cfg.max_depth}, dtype {lm.model.dtype}, "
          f"sandbox {sandbox.backend}", flush=True)
    rows = []
    for p in problems:
        # Pass 1 records the engine's calls (untimed; it also warms both paths' kernels for this
        # problem's shapes). Pass 2 is baseline (a) on those calls, pass 3 the engine again: the same
        # seeds give the same tree (checked), and both timed passes run warm.
        lm.reset_cache()
        rec = Recorder(LocalPolicy(lm), LocalValue(lm))
        tree = solve(p.question, "mcts", rec, rec, sandbox, cfg, ground_truth=p.answer, question_id=p.id, rewards=True)
        states = [s for kind, texts, _, _ in rec.calls if kind == "score" for s in texts]
        generations = [(prompt, samples) for kind, prompts, _, out in rec.calls if kind == "generate"
                       for prompt, samples in zip(prompts, out)]
        needed, distinct = token_counts(tree, lm.encode, scored_nodes(tree, states), generations)
        r = dict(id=p.id, nodes=len(tree.nodes) - 1, needed=needed, distinct=distinct)
        hf = HFReplay(lm, rec.calls)
        t0 = time.perf_counter()
        try:
            tree_hf = solve(p.question, "mcts", hf, hf, sandbox, cfg, ground_truth=p.answer, question_id=p.id,
                            rewards=True)
            r["same_tree_hf"] = shape(tree_hf) == shape(tree) and hf.i == len(rec.calls)
        except Diverged as e:
            r["same_tree_hf"], r["diverged"] = False, str(e)
        r.update(hf_wall_s=time.perf_counter() - t0, hf_model_s=hf.model_s, hf_computed=hf.computed,
                 hf_rss_mb=peak_rss_mb())
        lm.reset_cache()
        timed = Recorder(LocalPolicy(lm), LocalValue(lm))
        before, drafted, accepted = lm.usage.computed, lm.usage.draft_tokens, lm.usage.draft_accepted
        t0 = time.perf_counter()
        tree2 = solve(p.question, "mcts", timed, timed, sandbox, cfg, ground_truth=p.answer, question_id=p.id,
                      rewards=True)
        r.update(engine_wall_s=time.perf_counter() - t0, engine_model_s=timed.model_s,
                 engine_computed=lm.usage.computed - before, engine_drafted=lm.usage.draft_tokens - drafted,
                 engine_draft_accepted=lm.usage.draft_accepted - accepted,
                 engine_rss_mb=peak_rss_mb(), same_tree_engine=shape(tree2) == shape(tree))
        r["same_tree"] = r["same_tree_hf"] and r["same_tree_engine"]
        # The engine without drafts (lm/lookup.py), what drafts moved: its tree can differ from the
        # drafted one where a bf16 rounding flips a sample (a column's place changes attention's sum order).
        lm.reset_cache()
        rows_on, lm.draft_rows = lm.draft_rows, 0
        try:
            t0 = time.perf_counter()
            plain = Recorder(LocalPolicy(lm), LocalValue(lm))
            tree3 = solve(p.question, "mcts", plain, plain, sandbox, cfg, ground_truth=p.answer, question_id=p.id,
                          rewards=True)
            r.update(nodraft_wall_s=time.perf_counter() - t0, same_tree_nodraft=shape(tree3) == shape(tree))
        finally:
            lm.draft_rows = rows_on
        rows.append(r)
        print(f"  {p.id}: {r['nodes']} nodes, needed {needed} tokens; engine {r['engine_wall_s']:.1f} s "
              f"({r['engine_model_s']:.1f} s model, {r['engine_computed']} tokens, {r['engine_drafted']} of them drafts, "
              f"{r['engine_draft_accepted']} drafts accepted); "
              f"HF {r['hf_wall_s']:.1f} s = {r['hf_wall_s'] / r['engine_wall_s']:.2f}x "
              f"({hf.model_s:.1f} s model, {hf.computed} tokens); same tree: HF "
              f"{r['same_tree_hf']}, engine rerun {r['same_tree_engine']}; engine without drafts "
              f"{r['nodraft_wall_s']:.1f} s (same tree {r['same_tree_nodraft']})", flush=True)

    def total(k):
        return sum(r[k] for r in rows)

    lm.reset_cache()
    conc_nodes = []
    t0 = time.perf_counter()
    solve_many(problems, "mcts", LocalPolicy(lm), LocalValue(lm), sandbox, cfg,
               lambda p, tree, secs: conc_nodes.append(len(tree.nodes) - 1), concurrency=len(problems),
               serve=lm.serve, rewards=True)
    conc_s = (time.perf_counter() - t0) / len(problems)
    out = {"problems": len(rows), "config": cfg.to_dict(), "rows": rows,
           "engine_computed_over_needed": token_ratio(total("engine_computed"), total("needed")),
           "hf_computed_over_needed": token_ratio(total("hf_computed"), total("needed")),
           "engine_computed_over_distinct": token_ratio(total("engine_computed"), total("distinct")),
           "engine_unrejected_over_needed": token_ratio(
               total("engine_computed") - total("engine_drafted") + total("engine_draft_accepted"), total("needed")),
           "engine_s_per_problem": total("engine_wall_s") / len(rows),
           "nodraft_s_per_problem": total("nodraft_wall_s") / len(rows),
           "hf_s_per_problem": total("hf_wall_s") / len(rows),
           "model_s_ratio": total("hf_model_s") / max(total("engine_model_s"), 1e-9),
           "same_trees": all(r["same_tree"] for r in rows),
           "concurrent_s_per_problem": conc_s, "concurrent_nodes": sum(conc_nodes),
           "concurrent_rss_mb": peak_rss_mb()}
    out["hf_over_engine"] = out["hf_s_per_problem"] / out["engine_s_per_problem"]
    out["hf_over_nodraft"] = out["hf_s_per_problem"] / out["nodraft_s_per_problem"]
    out["hf_over_concurrent"] = out["hf_s_per_problem"] / conc_s
    print("\n| MCTS | engine | baseline (a) HF generate | ratio | peak RSS MB of this process so far (ru_maxrss: after engine / after HF) |\n|---|---|---|---|---|")
    print(f"| seconds per problem, wall, one at a time | {out['engine_s_per_problem']:.1f} | "
          f"{out['hf_s_per_problem']:.1f} | HF/engine {out['hf_over_engine']:.2f}x (target >= 10x) | "
          f"{rows[-1]['engine_rss_mb']:.0f} / {rows[-1]['hf_rss_mb']:.0f} |")
    print(f"| seconds per problem, wall, the engine without drafts (ALPHAMATH_DRAFTS=0) | "
          f"{out['nodraft_s_per_problem']:.1f} | | HF/engine {out['hf_over_nodraft']:.2f}x | |")
    print(f"| model seconds (policy + value) | {total('engine_model_s'):.1f} | {total('hf_model_s'):.1f} | "
          f"HF/engine {out['model_s_ratio']:.2f}x | |")
    print(f"| tokens computed / needed | {out['engine_computed_over_needed']:.3f} | "
          f"{out['hf_computed_over_needed']:.3f} | (engine target <= 1.1) | |")
    print(f"| tokens computed / needed, rejected draft positions left out (what was computed twice or for "
          f"nothing else) | {out['engine_unrejected_over_needed']:.3f} | | | |")
    print(f"| tokens computed / distinct positions (siblings' identical first tokens once) | "
          f"{out['engine_computed_over_distinct']:.3f} | | | |")
    print(f"| seconds per problem, the {len(rows)} searched at once ({out['concurrent_nodes']} nodes vs "
          f"{total('nodes')} one by one) | {conc_s:.1f} | | HF/engine {out['hf_over_concurrent']:.2f}x | "
          f"{out['concurrent_rss_mb']:.0f} |")
    print(f"same trees on both sides: {out['same_trees']}")
    return out


def memory_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """Read bandwidth: best of `repeats` sums of an `mb`-MB bf16 tensor (a decode step reads its
    weights and writes almost nothing, so a copy's read + write rate would set the floor too low)."""
    import torch

    src = torch.ones((mb << 20) // 2, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t0)
    return src.numel() * src.element_size() / best / 1e9


def engine_rates(lm, prompt: str, tokens: int, n: int, temperature: float = 0.6, drafts: bool = True) -> dict:
    """The engine's prefill and decode tokens/s on `prompt`, measured as llama.cpp's are (EOS ignored);
    `drafts` False: one token per row and step, as llama.cpp decodes here."""
    eos, lm.eos_ids = lm.eos_ids, set()
    rows_on = lm.draft_rows
    lm.draft_rows = rows_on if drafts else 0
    try:
        lm.reset_cache()
        lm.generate(["Warm-up: first-call allocations."], 1, temperature=temperature, max_new_tokens=4, seed=0)
        lm.reset_cache()
        ids = lm.encode(prompt)
        t0 = time.perf_counter()
        lm.generate([prompt], 1, temperature=temperature, max_new_tokens=1, seed=0)  # prefill, one token sampled
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        one = lm.generate([prompt], 1, temperature=temperature, max_new_tokens=tokens, seed=1)[0]
        decode1_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        many = lm.generate([prompt], n, temperature=temperature, max_new_tokens=tokens, seed=2)[0]
        decode_n_s = time.perf_counter() - t0
    finally:
        lm.eos_ids, lm.draft_rows = eos, rows_on
    out = {"prompt_tokens": len(ids), "prefill_tok_s": len(ids) / prefill_s,
           "decode1_tok_s": sum(s.token_count for s in one) / decode1_s,
           f"decode{n}_tok_s": sum(s.token_count for s in many) / decode_n_s, "rss_mb": peak_rss_mb()}
    # The weight-bandwidth limit of a decode step: the weights it reads (fp16 or float), read once from memory.
    out["weight_mb"] = lm.step_weight_bytes(1) / 1e6
    out["bandwidth_gbs"] = memory_bandwidth_gbs()
    out["step_floor_ms"] = out["weight_mb"] / out["bandwidth_gbs"]
    out["decode1_step_ms"] = 1000 / out["decode1_tok_s"]
    return out


def llama_cpp_vs_engine(args, lm, prompt: str) -> dict:
    import torch

    from alphamath.model.packed import fp16_below_rows

    threads = torch.get_num_threads()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(prompt)
    proc = subprocess.run([sys.executable, "-m", "tests.bench_llamacpp", "--prompt-file", f.name, "--tokens",
                           str(args.decode_tokens), "--n", str(args.n_children), "--threads", str(threads)],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600)
    Path(f.name).unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp bench failed ({proc.returncode}): {proc.stderr[-2000:]}")
    cpp = json.loads(proc.stdout.strip().splitlines()[-1])
    eng = engine_rates(lm, prompt, args.decode_tokens, args.n_children, drafts=False)  # like for like
    drafted = engine_rates(lm, prompt, args.decode_tokens, args.n_children) if lm.draft_rows else None
    # The same engine with float weights in every matmul, where the default reads fp16 (model/packed.py):
    # what the fp16 decode weights moved, measured in the same run. Only fp32 models read fp16 copies; a bf16
    # model's "float" engine would be the same engine again (until s40 it ran anyway: its 10% spread read as
    # a difference).
    exact = None
    if fp16_below_rows(lm.model.dtype, lm.device):
        from alphamath.lm import LocalLM

        exact = engine_rates(LocalLM(lm.model, decode_weights="float"), prompt, args.decode_tokens, args.n_children,
                             drafts=False)
    n = args.n_children
    print(f"\nllama.cpp (GGUF Q4_1, llama-cpp-python, {threads} threads) vs engine ({lm.model.dtype}), "
          f"{eng['prompt_tokens']}-token MCTS prompt ({cpp['prompt_tokens']} for llama.cpp's tokenizer), "
          f"{args.decode_tokens} tokens decoded per sequence")
    head = "| tokens/s | engine | llama.cpp | engine/llama.cpp | target |"
    if drafted:
        head += " engine with drafts | its ratio |"
    if exact:
        head += " engine, float weights | its ratio |"
    print(head + "\n" + "|---" * head.count(" | ") + "|---|")
    for key, label, target in (("prefill_tok_s", "prefill", ""), ("decode1_tok_s", "decode, batch 1", ">= 0.67"),
                               (f"decode{n}_tok_s", f"decode, n = {n} continuations", ">= 1")):
        row = f"| {label} | {eng[key]:.1f} | {cpp[key]:.1f} | {eng[key] / cpp[key]:.2f} | {target} |"
        row += f" {drafted[key]:.1f} | {drafted[key] / cpp[key]:.2f} |" if drafted else ""
        print(row + (f" {exact[key]:.1f} | {exact[key] / cpp[key]:.2f} |" if exact else ""))
    print(f"| peak RSS MB | {eng['rss_mb']:.0f} (this process) | {cpp['rss_mb']:.0f} (its process) | | |")
    for name, e in (("engine", eng), ("engine, float weights", exact)):
        if e:
            print(f"{name}: decode step at batch 1 {e['decode1_step_ms']:.1f} ms = {e['decode1_step_ms'] / e['step_floor_ms']:.1f}x "
                  f"the weight-bandwidth floor ({e['weight_mb']:.0f} MB of weights read / {e['bandwidth_gbs']:.1f} GB/s "
                  f"read bandwidth = {e['step_floor_ms']:.2f} ms)")
    return {"engine": eng, "engine_drafts": drafted, "engine_float_weights": exact, "llama_cpp": cpp,
            "decode1_ratio": eng["decode1_tok_s"] / cpp["decode1_tok_s"],
            f"decode{n}_ratio": eng[f"decode{n}_tok_s"] / cpp[f"decode{n}_tok_s"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/gsm8k/dev.jsonl"))
    # 4, not 2 (session 41): with 2 the MCTS ratio moved by +-25% with one tree's shape (session 40:
    # a tree of long samples took it from 9.5x to 7.3x at the same cost per needed token)
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--n-children", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-depth", type=int, default=8)
    ap.add_argument("--c-puct", type=float, default=1.25)
    ap.add_argument("--leaves-per-call", type=int, default=1,
                    help="MCTS leaves expanded per model call (virtual loss); baseline (a) replays the same tree")
    ap.add_argument("--decode-tokens", type=int, default=128, help="tokens per sequence in the llama.cpp comparison")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--skip-mcts", action="store_true")
    ap.add_argument("--skip-grpc", action="store_true")
    ap.add_argument("--grpc-scale", type=float, default=1.0, help="multiply the problems per gRPC level")
    ap.add_argument("--json-out", default=str(ROOT / "var/bench.json"))
    args = ap.parse_args(argv)

    from alphamath.lm import LocalLM
    from alphamath.model import embedded_checkpoint
    from alphamath.sandbox.executor import Executor

    problems = load_problems(args.data, args.problems)
    lm = LocalLM(embedded_checkpoint())
    report: dict = {"command": " ".join(["python -m tests.bench", *(argv if argv is not None else sys.argv[1:])])}
    if not args.skip_llama_cpp:
        from alphamath.local import LocalPolicy
        report["llama_cpp"] = llama_cpp_vs_engine(args, lm, LocalPolicy(lm).render_prompt(problems[0].question))
    if not args.skip_mcts:
        sandbox = Executor(backend="runsc")
        try:
            report["mcts"] = mcts_vs_hf(args, lm, sandbox, problems)
        finally:
            sandbox.close()
    del lm
    if not args.skip_grpc:
        from tests import bench_grpc
        report["grpc"] = bench_grpc.run(scale=args.grpc_scale)
    # Children's peaks are read as VmHWM inside them (llama.cpp, the stack's services): Linux carries
    # ru_maxrss across fork and exec, so RUSAGE_CHILDREN would report this process's own peak.
    report["peak_rss_mb"] = peak_rss_mb()
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json_out}")


if __name__ == "__main__":
    main()
