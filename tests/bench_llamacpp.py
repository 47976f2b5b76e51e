"""llama.cpp on the embedded GGUF through llama-cpp-python: prefill and decode tokens/s (part of `make bench`).

What CPU users run. Measured with llama.cpp's own batch API (as its `batched` example does):
  * prefill: the prompt in one llama_decode (split into n_batch chunks), memory cleared first;
  * decode at batch 1: `tokens` tokens sampled one at a time after the prompt;
  * decode at n: the prompt's KV copied to n sequences, then `tokens` steps of one batch of n tokens.
EOS is not a stop, so every side decodes exactly the same number of tokens.
Weights stay in llama.cpp's plain CPU buffers (`use_extra_bufts` off): with llama-cpp-python 0.3.36
on this Xeon, the AMX repack of Q4_1 weights crashed the first llama_decode (segfault).
"""
from __future__ import annotations

import ctypes
import time



def own_peak_rss_mb() -> float:
    """Peak RSS of this process's own address space (VmHWM). ru_maxrss is not used here: Linux carries
    it across fork and exec, so a child started by the bench would report the bench's own peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM in /proc/self/status")


_LOG_CB = None


def _quiet(lc) -> None:
    """Route llama.cpp's log (hundreds of lines per context) to nowhere."""
    global _LOG_CB
    if _LOG_CB is None:
        _LOG_CB = lc.llama_log_callback(lambda level, text, user: None)
        lc.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


class LlamaCpp:
    """A llama.cpp context with room for `n_seq` sequences of `n_ctx` tokens each."""

    def __init__(self, gguf: str, n_ctx: int, n_seq: int, threads: int, n_batch: int = 512, extra_bufts: bool = False):
        import llama_cpp as lc

        self.lc = lc
        _quiet(lc)
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.use_extra_bufts = extra_bufts
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx * n_seq, n_batch, n_batch, n_seq
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = True  # sequences share one KV buffer, so a copied prompt is not duplicated
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_batch, self.n_seq = n_batch, n_seq
        self.batch = lc.llama_batch_init(max(n_batch, n_seq), 0, n_seq)

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        buf = (self.lc.llama_token * (len(raw) + 16))()
        n = self.lc.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), False, True)
        if n < 0:
            raise RuntimeError("llama.cpp tokenize failed")
        return list(buf[:n])

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, wants logits)."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def prefill(self, tokens: list[int]) -> None:
        """Clear the KV cache and run the prompt in sequence 0; logits of its last token kept."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        for s in range(0, len(tokens), self.n_batch):
            chunk = tokens[s:s + self.n_batch]
            self._decode([(t, s + i, 0, s + i == len(tokens) - 1) for i, t in enumerate(chunk)])

    def sampler(self, temperature: float, seed: int):
        lc = self.lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(temperature))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
        return chain

    def decode(self, prompt_len: int, n: int, steps: int, temperature: float, seed: int = 0) -> int:
        """After prefill: copy the prompt to n sequences and sample `steps` tokens in each, one batch
        of n per step. Returns the tokens decoded (n * steps)."""
        lc = self.lc
        mem = lc.llama_get_memory(self.ctx)
        for s in range(1, n):
            lc.llama_memory_seq_cp(mem, 0, s, -1, -1)
        samplers = [self.sampler(temperature, seed + s) for s in range(n)]
        idx = [-1] * n  # the prompt's logits: the last output of the prefill
        try:
            for step in range(steps):
                toks = [lc.llama_sampler_sample(samplers[s], self.ctx, idx[s]) for s in range(n)]
                self._decode([(toks[s], prompt_len + step, s, True) for s in range(n)])
                idx = list(range(n))
        finally:
            for smp in samplers:
                lc.llama_sampler_free(smp)
        return n * steps

    def close(self) -> None:
        lc = self.lc
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)


def rates(gguf: str, prompt: str, tokens: int, n: int, threads: int, temperature: float = 0.6) -> dict:
    """Measured prefill and decode tokens/s of llama.cpp for one prompt (see the module doc)."""
    llm = LlamaCpp(gguf, n_ctx=len(prompt) // 2 + tokens + 64, n_seq=n, threads=threads)
    try:
        ids = llm.tokenize(prompt)
        llm.prefill(ids[:32])  # warm-up: first-call allocations
        t0 = time.perf_counter()
        llm.prefill(ids)
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        done1 = llm.decode(len(ids), 1, tokens, temperature)
        decode1_s = time.perf_counter() - t0
        llm.prefill(ids)
        t0 = time.perf_counter()
        done_n = llm.decode(len(ids), n, tokens, temperature)
        decode_n_s = time.perf_counter() - t0
    finally:
        llm.close()
    return {"prompt_tokens": len(ids), "prefill_tok_s": len(ids) / prefill_s,
            "decode1_tok_s": done1 / decode1_s, f"decode{n}_tok_s": done_n / decode_n_s, "threads": threads,
            "rss_mb": own_peak_rss_mb()}


if __name__ == "__main__":
    import argparse
    import json

    from alphamath.model.embedded import embedded_gguf

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-file", help="the prompt (default: a short repeated question)")
    a = ap.parse_args()
    text = "Question: Tom has 3 boxes with 12 apples each. He gives away 7 apples. How many are left?\n" * 8
    if a.prompt_file:
        with open(a.prompt_file, encoding="utf-8") as f:
            text = f.read()
    print(json.dumps(rates(str(embedded_gguf()), text, a.tokens, a.n, a.threads)))  # one line: read by tests/bench.py
