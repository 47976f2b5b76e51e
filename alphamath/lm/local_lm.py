"""LocalLM: one local model serving both the policy (generation) and the value head.

It exists to compute every token of a search tree through the trunk once, with the prefix cache
(radix_cache.py), the decode batch (kv.py) and continuous batching (scheduler.py):

- `generate` prefills only what follows a prompt's longest cached prefix, then decodes all samples
  of all prompts in one batch and stores each sample's KV back in the tree;
- `score` computes only the tokens past a state's cached prefix and reads the value there.
"""
from __future__ import annotations

import os
import secrets
import threading
from dataclasses import replace
from typing import Sequence

import torch
from transformers import DynamicCache

from alphamath.interfaces import Sample, Usage
from alphamath.lm.kv import _Batch, _Decoding, _Request, _RoomyLayer, _Row
from alphamath.lm.lock import COMPUTE, _FairLock
from alphamath.lm.budget import MemoryBudget, configure_allocator, prefill_bytes
from alphamath.lm.radix_cache import PrefixCache, _lcp
from alphamath.lm.scheduler import DEFAULT_MAX_BATCH_ROWS, Scheduler
from alphamath.model import ValueHeadModel, avx2, decode
from alphamath.model.fast_llama import FastLlama

PAD_WASTE, PAD_SLACK = 1.25, 64  # a padded prefill computes at most 1.25x its rows' new tokens, + 64 (_extend)
SHARED_MIN = 64  # uncached tokens that every row of a prefill shares, from which they are computed once (_extend)


class LocalLM(Scheduler):
    """Policy and value from one `ValueHeadModel`, computing every token at most once (see module doc)."""

    def __init__(self, model: ValueHeadModel | str | os.PathLike, tokenizer=None, *, dtype=None,
                 device: str | torch.device = "cpu", budget: MemoryBudget | None = None,
                 max_cached_tokens: int | None = None, max_batch_kv_bytes: int | None = None,
                 max_prefill_bytes: int | None = None, max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
                 decode_weights: str | None = None):
        """Memory: `budget` (default: ALPHAMATH_MEMORY_MB, see alphamath/lm/budget.py) sets the prefix
        cache, the decode batch's KV and the prefill's activations; the max_* arguments override one.
        `decode_weights` ("fp16" or "float", default ALPHAMATH_DECODE_WEIGHTS, else fp16): the weights
        a few-row matmul reads where the CPU computes fp32 (model/packed.py)."""
        if not isinstance(model, ValueHeadModel):
            model = ValueHeadModel.from_pretrained(model, dtype=dtype, device=device)
        self.model = model.eval()
        # Llama trunks run model/fast_llama.py's forward (far fewer operations per step; few-row matmuls
        # read fp16 weights where the CPU computes fp32, see model/packed.py).
        self._fast = FastLlama(self.model.lm, decode_weights) if FastLlama.supports(self.model.lm) else None
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if self.tokenizer is None:
            raise ValueError("LocalLM needs a tokenizer (none was saved with the model)")
        configure_allocator()
        decode.kernel(), avx2.kernel()  # built or loaded now, not inside the first decode step
        cfg = self.model.lm.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._kv_bytes_per_slot = (2 * cfg.num_hidden_layers * getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
                                   * head_dim * torch.finfo(self.model.dtype).bits // 8)
        self._shape = (cfg.num_attention_heads, cfg.hidden_size, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size))
        # Where decode attention runs on AMX tiles, a batch also holds its prompts' KV as decode.prompt_tiles.
        self._prompt_tiles = (self._fast is not None and self.model.dtype == torch.bfloat16 and head_dim == 64
                              and decode.tiles_on())
        # Where the C++ kernels compute decode attention (decode.cpp in bf16, avx2.cpp in fp32), a batch holds the
        # prefix its prompts share once (kv.py's root).
        self._root = self._fast is not None and self._fast.kernel_attention()
        self.budget = budget or MemoryBudget.from_env()
        self.cache = PrefixCache(max_cached_tokens or self.budget.cached_tokens(self._kv_bytes_per_slot))
        self.max_batch_kv_bytes = max_batch_kv_bytes or self.budget.batch_kv_bytes
        self.max_prefill_bytes = max_prefill_bytes or self.budget.prefill_bytes
        self.usage = Usage()
        self.reused_tokens = 0  # tokens served from the prefix cache instead of being recomputed
        self.lock = _FairLock()  # the model, the prefix cache and the tokenizer
        self._head_out: torch.Tensor | None = None  # a decode step's logits (`_logits`)
        self.eos_ids = self._eos_ids()
        self.max_batch_rows = max_batch_rows
        # Draft tokens (lm/lookup.py, kv.py's _Batch.step) where the layer kernels can verify them:
        # rows x (1 + draft) up to this many query rows per step. ALPHAMATH_DRAFTS=0 turns drafts off.
        drafts = os.environ.get("ALPHAMATH_DRAFTS", "1").strip() != "0"
        self.draft_rows = self._fast.verify_rows() if self._fast is not None and drafts else 0
        self.row_cost = self._fast.row_cost() if self._fast is not None else 1.0  # a query row / a one-row step
        self._queue: list[_Request] = []  # generate() calls waiting to join the decode batch
        self._cv = threading.Condition()
        self._batch: _Batch | None = None  # the running decode batch, stepped by the leading caller
        self._leading = False  # whether a caller thread is running the decode loop

    def _eos_ids(self) -> set[int]:
        ids = set()
        for src in (getattr(self.model.lm, "generation_config", None), self.model.config, self.tokenizer):
            eos = getattr(src, "eos_token_id", None)
            if eos is not None:
                ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        return ids

    def _hidden(self, ids, prompts=None, **kw):
        """The trunk's last hidden states and cache (ValueHeadModel.hidden's contract); `prompts`: a
        decode step over shared prompts (kv.py's _Batch)."""
        if self._fast is not None:
            return self._fast.hidden(ids, prompts=prompts, **kw)
        if prompts is not None:
            return self._joined_hidden(ids, prompts, **kw)
        return self.model.hidden(ids, **kw)

    def _joined_hidden(self, ids, prompts, attention_mask, past_key_values, position_ids, use_cache=True):
        """A shared-prompt decode step through transformers' own forward (architectures FastLlama does
        not cover): each row's prompt columns and own columns are joined into one cache (a copy per
        step, slower but the same numbers), and the new column is written back to the row's own."""
        own, (B, W) = past_key_values.layers, (ids.shape[0], past_key_values.get_seq_length())
        group = torch.div(prompts.slot, prompts.members.shape[1], rounding_mode="floor")
        L = prompts.mask.shape[-1]
        joined = DynamicCache()
        for i, layer in enumerate(own):
            roomy = _RoomyLayer.empty(layer.keys[0], B, L + W, 1)
            roomy.put(slice(None), 0, torch.cat([prompts.keys[i][group], layer.keys], 2),
                      torch.cat([prompts.values[i][group], layer.values], 2))
            joined.layers.append(roomy)
        own_mask = attention_mask if attention_mask is not None else torch.ones(B, W + 1, dtype=torch.long, device=ids.device)
        mask = torch.cat([(prompts.mask[group, 0, 0] == 0).long(), own_mask], 1)
        h, _ = self.model.hidden(ids, attention_mask=mask, past_key_values=joined, position_ids=position_ids,
                                 use_cache=True)
        for layer, new in zip(own, joined.layers):
            layer.update(new.keys[:, :, -1:], new.values[:, :, -1:])
        return h, past_key_values

    def step_weight_bytes(self, rows: int = 1) -> int:
        """Bytes of weights a forward of `rows` rows reads (all parameters where FastLlama does not run)."""
        if self._fast is not None:
            return self._fast.step_weight_bytes(rows)
        distinct = {p.data_ptr(): p for p in self.model.lm.parameters()}  # tied embeddings count once
        return sum(p.numel() * p.element_size() for p in distinct.values())

    def _logits(self, h: torch.Tensor, step: bool = False) -> torch.Tensor:
        """The LM head's logits in the model's dtype. A bf16 model's are sampled as they are (`_pick`): an fp32
        copy of a 48-row step's was 9.4 MB of fresh pages to write and read once more. `step`: a decode step's,
        written into one buffer the LM keeps (`_head_out`, grown to the most rows a step has had: at most
        max_batch_rows x the vocabulary), which the next step's logits overwrite; a fresh tensor of 1 MB or
        more is mmap-ed (lm/budget.py), and faulting in a 48-row step's 4.7 MB cost ~1.5 ms a step."""
        if self._fast is None:
            return self.model.lm_head(h)
        if not (step and self._fast.lm_head.pairs):
            return self._fast.logits(h)
        rows = h.numel() // h.shape[-1]
        if self._head_out is None or self._head_out.shape[0] < rows:
            self._head_out = torch.empty(rows, self._fast.lm_head.out_features, dtype=h.dtype, device=h.device)
        return self._fast.logits(h, self._head_out)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode(self, text: str) -> list[int]:
        """Token ids without added special tokens: rendered prompts already carry the chat template's."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _count(self, name: str) -> None:
        self.usage.calls[name] = self.usage.calls.get(name, 0) + 1

    def reset_cache(self) -> None:
        """Drop all cached KV (after loading new weights the cached states are stale)."""
        with self.lock:
            self.cache.clear()

    # -- prefill / extend ------------------------------------------------------------------------
    def _lookup(self, tokens: list[int], need_logits: bool) -> _Row:
        """Longest cached prefix of `tokens`; keeps >= 1 token to compute when logits are needed."""
        m, parts, vals = self._match(tokens, need_logits)
        self.reused_tokens += m
        return _Row(tokens, m, parts, vals, last_logits_needed=need_logits)

    def _match(self, tokens: list[int], need_logits: bool) -> tuple:
        """The prefix cache's match for `tokens`, short of the last token when logits are needed."""
        return self.cache.match_parts(tokens[:len(tokens) - 1] if need_logits else tokens)

    def _shared_first(self, rows: list[_Row]) -> None:
        """Where every row of a prefill shares a prefix the cache lacks (SHARED_MIN tokens or more past the longest
        cached part), compute that prefix once, as a row of its own, cache it, and look the rows up again: a
        cold value model scored its first two prompts as two padded rows of 435 tokens each, the 338 tokens
        of few-shot prompt they share computed twice, 1.7 s of a 22 s run at 16 searches (s46); the first
        children of a question, cold, held the question three to five times over."""
        if len(rows) < 2:
            return
        first = rows[0].tokens
        shared = min(_lcp(first, r.tokens) for r in rows[1:])
        if shared - max(r.cached for r in rows) < SHARED_MIN:
            return
        prefix = self._lookup(first[:shared], need_logits=False)
        self._extend_batch([prefix])
        self.cache.insert(prefix.tokens, prefix.kv, prefix.values)
        for r in rows:
            m, parts, vals = self._match(r.tokens, r.last_logits_needed)
            if m > r.cached:
                self.reused_tokens += m - r.cached
                r.cached, r.past, r.past_values = m, parts, vals

    def _extend(self, rows: list[_Row]) -> None:
        """Compute the uncached tokens of all rows, in forwards whose estimated memory stays within
        max_prefill_bytes (a row alone always runs). Rows go in order of their new tokens, and a forward
        closes before padding would make it compute more than PAD_WASTE times its rows' new tokens
        (plus PAD_SLACK): a padded forward computes rows x the longest row's new tokens, so a prompt's
        ~400 uncached tokens beside ~60-token states made every state cost 400. On an AVX2 CPU, where
        a prefill's matmuls run at the FMA units' limit, the value service's batches across requests
        spent that: the stack at 16 concurrent searches went 17.2-17.6 -> 20.4-21.2 problems/min with
        its batches capped at one request (session 25)."""
        self._shared_first([r for r in rows if r.cached < len(r.tokens)])
        todo = sorted((r for r in rows if r.cached < len(r.tokens)), key=lambda r: len(r.tokens) - r.cached)
        batch: list[_Row] = []
        real = 0
        for row in todo:
            n = len(row.tokens) - row.cached  # the longest so far: rows are sorted by it
            grown = batch + [row]
            past = max(r.cached for r in grown)
            padded = len(grown) * n
            if batch and (padded > PAD_WASTE * (real + n) + PAD_SLACK or prefill_bytes(
                    len(grown), past, n, self._kv_bytes_per_slot, *self._shape) > self.max_prefill_bytes):
                self._extend_batch(batch)
                batch, real = [], 0
            batch.append(row)
            real += n
        if batch:
            self._extend_batch(batch)

    def _extend_batch(self, rows: list[_Row]) -> None:
        """One forward. Row layout along the KV axis: [pad | cached past | new tokens | pad].

        Pads are masked out and positions are explicit, so each row sees exactly its own tokens;
        right-padding the new tokens keeps every query row attending to at least one real token.
        """
        dev = self.device
        B = len(rows)
        M = max(r.cached for r in rows)
        S = max(len(r.tokens) - r.cached for r in rows)
        ids = torch.zeros(B, S, dtype=torch.long, device=dev)
        pos = torch.zeros(B, S, dtype=torch.long, device=dev)
        mask = torch.zeros(B, M + S, dtype=torch.long, device=dev)
        for i, r in enumerate(rows):
            new = r.tokens[r.cached:]
            ids[i, :len(new)] = torch.tensor(new, device=dev)
            pos[i, :len(new)] = torch.arange(r.cached, len(r.tokens), device=dev)
            mask[i, M - r.cached:M + len(new)] = 1
        cache = DynamicCache()
        if M:  # the cached pasts, written once into buffers with room for the new tokens
            template = next(r.past for r in rows if r.past is not None)
            for layer, parts in enumerate(template):
                roomy = _RoomyLayer.empty(parts[0][0], B, M, S)
                for i, r in enumerate(rows):
                    roomy.put_parts(i, M - r.cached, r.past[layer] if r.cached else [])
                cache.layers.append(roomy)
        h, cache = self._hidden(ids, attention_mask=mask, past_key_values=cache, position_ids=pos, use_cache=True)
        values = self.model.values_from_hidden(h)
        last = torch.tensor([len(r.tokens) - r.cached - 1 for r in rows], device=dev)
        last_h = h[torch.arange(B, device=dev), last]
        # The LM head only where a row's next token is drawn: a value model's prefills (scoring) need none, and
        # the head is a fifth of the model's weights to read per call.
        logits = self._logits(last_h) if any(r.last_logits_needed for r in rows) else None
        layers = _cache_layers(cache)
        for i, r in enumerate(rows):
            n = len(r.tokens) - r.cached
            r.kv = [(k[i, :, M - r.cached:M + n], v[i, :, M - r.cached:M + n]) for k, v in layers]
            new_vals = values[i, :n]
            r.values = new_vals if r.past_values is None else torch.cat([r.past_values, new_vals])
            r.last_logits = logits[i] if logits is not None else None
            r.last_hidden = last_h[i]
            self.usage.prefill_tokens += n

    # -- value ------------------------------------------------------------------------------------
    def score(self, states: Sequence[str]) -> list[float]:
        """Value head at the last token of each state; cached prefixes are reused, new KV stored.
        Computed on the thread serving decode loops, if one does (scheduler.py: one OpenMP pool)."""
        if not states:
            return []
        return self._on_serving_thread(lambda: self._score(states))

    @torch.inference_mode()
    def _score(self, states: Sequence[str]) -> list[float]:
        with self.lock:
            self._count("score")
            unique = {s: None for s in states}
            rows = {}
            for s in unique:
                tokens = self.encode(s)
                if not tokens:
                    raise ValueError("cannot score an empty state")
                rows[s] = self._lookup(tokens, need_logits=False)
            with COMPUTE:
                self._extend([r for r in rows.values() if r.cached < len(r.tokens)])
            for r in rows.values():
                if r.kv is not None:
                    self.cache.insert(r.tokens, r.kv, r.values)
                else:
                    r.values = r.past_values
            return [float(rows[s].values[-1]) for s in states]

    def features(self, states: Sequence[str]) -> torch.Tensor:
        """[len(states), H] float32: the trunk's output at the last token of each state, the input
        `score` gives the value head. A head fit on these (trainer_svc.head_fit) sees exactly what it
        will be read on. Cached prefixes are reused and the KV is stored, so a caller who passes a
        tree's states parents first computes each token of the tree once; the last token is always
        recomputed (the cache keeps KV and values, not hidden states)."""
        if not states:
            return torch.empty(0, self.model.config.hidden_size)
        return self._on_serving_thread(lambda: self._features(states))

    @torch.inference_mode()
    def _features(self, states: Sequence[str]) -> torch.Tensor:
        with self.lock:
            self._count("features")
            rows = {}
            for s in dict.fromkeys(states):
                tokens = self.encode(s)
                if not tokens:
                    raise ValueError("cannot read the features of an empty state")
                rows[s] = self._lookup(tokens, need_logits=True)
            with COMPUTE:
                self._extend(list(rows.values()))
            for r in rows.values():
                self.cache.insert(r.tokens, r.kv, r.values)
            return torch.stack([rows[s].last_hidden.float() for s in states])

    # -- policy -----------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], n: int, *, stop: Sequence[str] = (), temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int = 256,
                 seed: int | Sequence[int | None] | None = None) -> list[list[Sample]]:
        """n samples per prompt (`seed`: one for all, or one per prompt), decoded in the shared batch.

        Calls from several threads are decoded together: a call joins the batch that is running
        (continuous batching), so concurrent searches share every forward pass. Each sample's
        randomness comes from its own seed, so results do not depend on batch-mates.
        `cumulative_logprob` sums log p(token) under the distribution the token was drawn from
        (logits / temperature, renormalised over the top-p nucleus; the raw logits when greedy), as
        TGI's `details` and the paper's vLLM engine report it: the MCTS prior is the same quantity
        on every backend.
        Texts end right after the first stop string matched; EOS counts as a token but adds no text.
        Temperature 0 is greedy: one row is decoded and copied n times.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not prompts:
            return []
        greedy = temperature == 0
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        drawn = secrets.randbits(63)
        seeds = [0 if greedy else (drawn if s is None else int(s)) for s in seeds]
        unique = list(dict.fromkeys(prompts))
        with self.lock:  # fast tokenizers must not be used from two threads at once
            self._count("generate")
            encoded = [self.encode(p) for p in unique]
        if not all(encoded):
            raise ValueError("cannot generate from an empty prompt")
        index = {p: i for i, p in enumerate(unique)}
        pairs = list(dict.fromkeys((index[p], sd) for p, sd in zip(prompts, seeds)))
        req = _Request((tuple(s for s in stop if s), float(temperature), float(top_p), int(max_new_tokens)),
                       unique, encoded, pairs, n)
        with self._cv:
            self._queue.append(req)
            self._cv.notify_all()
        self._wait_or_lead(req)
        if req.error is not None:
            raise req.error
        by_pair: list[list[Sample]] = [[] for _ in pairs]
        for smp in req.samples:
            out = Sample(smp.text, len(smp.tokens), smp.logprob, smp.finish)
            by_pair[smp.pair].extend(replace(out) for _ in range(n if greedy else 1))
        pair_of = {pr: j for j, pr in enumerate(pairs)}
        return [[replace(x) for x in by_pair[pair_of[(index[p], sd)]]] for p, sd in zip(prompts, seeds)]

    @staticmethod
    def _pick(logits: torch.Tensor, rows: list[_Decoding], temperature: float, top_p: float) -> tuple[list[int], list[float]]:
        """Next token of each row (greedy, or sampled with the row's own generator) and its log-prob
        under the distribution it was drawn from (raw logits when greedy)."""
        if temperature == 0:
            logits = logits.float()
            toks = torch.argmax(logits, dim=-1)
            picked = logits.gather(1, toks.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)
            return toks.tolist(), picked.tolist()
        # Inverse-CDF sampling: one uniform per row from the row's own generator (so a sample does not
        # depend on its batch-mates), then one batched search of the cumulative distribution.
        u = torch.cat([torch.rand(1, generator=r.generator, device=logits.device) for r in rows])
        if top_p == 1.0 and logits.device.type == "cpu" and avx2.kernel() is not None:
            # avx2.cpp: the same draw, reading bf16 logits as they are (their fp32 values, exactly)
            toks, picked = avx2.sample(logits, u, temperature)
            return toks.tolist(), picked.tolist()
        logits = logits.float()
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
            drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= top_p  # never drops the top token
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        cdf = torch.cumsum(probs, dim=-1)
        toks = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        toks = toks.clamp_(max=logits.shape[-1] - 1)
        picked = torch.log(probs.gather(1, toks.unsqueeze(1)).squeeze(1) / probs.sum(dim=-1))
        return toks.tolist(), picked.tolist()

    def _finished(self, s: _Decoding, tok: int, stop: Sequence[str], max_new_tokens: int, window: int) -> bool:
        """Has sample `s` just ended? Only the last `window` tokens are decoded to look for a stop string
        (re-decoding the whole text every token was quadratic); the full text is decoded once, at the end."""
        if tok in self.eos_ids:
            s.text = self.tokenizer.decode(s.tokens[:-1], skip_special_tokens=True)
            s.finish = "eos"
            return True
        tail = self.tokenizer.decode(s.tokens[-window:], skip_special_tokens=True) if stop else ""
        if len(s.tokens) < max_new_tokens and not any(st in tail for st in stop):
            return False
        s.text = self.tokenizer.decode(s.tokens, skip_special_tokens=True)
        hits = [(i, st) for st in stop if (i := s.text.find(st)) >= 0]
        if hits:
            i, st = min(hits)
            s.text = s.text[: i + len(st)]
            s.finish = "stop"
        elif len(s.tokens) >= max_new_tokens:
            s.finish = "length"
        return s.finish is not None


def _cache_layers(cache: DynamicCache):
    """Per-layer (keys, values) of a DynamicCache ([batch, heads, tokens, head_dim]); transformers>=4.56 API."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise RuntimeError("this transformers version's DynamicCache has no .layers; need transformers>=4.56")
    return [(layer.keys, layer.values) for layer in layers]
