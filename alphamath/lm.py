"""One local model serving both the policy (generation) and the value head, with a prefix KV cache.

MCTS asks for the same text over and over: every expansion of a question starts with the same
few-shot prompt, the n siblings of an expansion share their parent state, and the value of a child
is the parent state plus the sampled step plus a few appended tokens (the code output, "</step>").
`LocalLM` keeps the KV states (and the value-head output) of every token it has computed in a
radix tree keyed by token ids, so each token of the tree is run through the trunk once:

- `generate` prefills only what follows a prompt's longest cached prefix, then decodes all samples
  of all prompts in one batch and stores each sample's KV back in the tree;
- `score` computes only the tokens past a state's cached prefix and reads the value there.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from alphamath.interfaces import Sample, Usage
from alphamath.model import ValueHeadModel

KV = list  # per layer: (keys [heads, tokens, head_dim], values [heads, tokens, head_dim])
DEFAULT_MAX_CACHED_TOKENS = 32768  # ~0.75 GB of bf16 KV for SmolLM2-135M (30 layers x 3 kv heads x 64)
DEFAULT_MAX_BATCH_TOKENS = 16384  # rows x (past + new) per prefill forward, bounds activation memory
DEFAULT_MAX_BATCH_ROWS = 128  # samples decoded at once
# KV of the running batch: rows x (width + room) slots, every row padded to the widest prompt. Joining
# copies it once more, so the peak is about twice this. Without a bound, 16 concurrent MCTS searches
# (80 rows of ~2k-token prompts, fp32) grew past 24 GB and were OOM-killed.
DEFAULT_MAX_BATCH_KV_BYTES = 3 << 30


class _FairLock:
    """A re-entrant lock granted in arrival order. The decode loop takes the model lock again right
    after every step; with a plain lock the thread releasing it usually wins the race, so a score()
    or a tokenizer call from another thread could wait for the whole batch to drain."""

    def __init__(self):
        self._cv = threading.Condition(threading.Lock())
        self._next = self._serving = 0
        self._owner: int | None = None
        self._depth = 0

    def __enter__(self):
        me = threading.get_ident()
        with self._cv:
            if self._owner == me:
                self._depth += 1
                return self
            ticket, self._next = self._next, self._next + 1
            while self._serving != ticket:
                self._cv.wait()
            self._owner, self._depth = me, 1
        return self

    def __exit__(self, *exc):
        with self._cv:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._serving += 1
                self._cv.notify_all()


# ---- radix tree of KV states -------------------------------------------------------------------
class _Node:
    __slots__ = ("tokens", "kv", "values", "children", "parent", "last_used")

    def __init__(self, tokens: list[int], kv: KV, values: torch.Tensor, parent: "_Node | None"):
        self.tokens, self.kv, self.values, self.parent = tokens, kv, values, parent
        self.children: dict[int, _Node] = {}
        self.last_used = 0


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _slice_kv(kv: KV, start: int, stop: int | None = None, copy: bool = False) -> KV:
    out = [(k[:, start:stop], v[:, start:stop]) for k, v in kv]
    return [(k.clone(), v.clone()) for k, v in out] if copy else out


class _RoomyLayer(DynamicLayer):
    """A cache layer with room for `room` more tokens, written in place.

    transformers' DynamicLayer `torch.cat`s the whole cache on every decoded token; on CPU that
    re-allocation was ~45% of decode time. Here `keys`/`values` are views of preallocated buffers.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        B, H, L, D = keys.shape
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._k = keys.new_empty(B, H, L + room, D)
        self._v = values.new_empty(B, H, L + room, D)
        self._k[:, :, :L], self._v[:, :, :L] = keys, values
        self._set(L)

    def _set(self, n: int) -> None:
        self.n = n
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    def update(self, key_states, value_states, cache_kwargs=None):
        n, m = self.n, key_states.shape[-2]
        if n + m > self._k.shape[2]:  # every admission leaves max_new_tokens of room: a bug if reached
            raise RuntimeError(f"KV buffer out of room: {n} + {m} > {self._k.shape[2]}")
        self._k[:, :, n:n + m], self._v[:, :, n:n + m] = key_states, value_states
        self._set(n + m)
        return self.keys, self.values

    def select(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Keep batch `rows` and KV columns `cols` (a bool mask over the filled columns), keeping the room."""
        n = int(cols.sum())
        room = self._k.shape[2] - self.n
        keep_k, keep_v = self.keys[rows][:, :, cols], self.values[rows][:, :, cols]
        self._k = keep_k.new_empty(*keep_k.shape[:2], n + room, keep_k.shape[3])
        self._v = torch.empty_like(self._k)
        self._k[:, :, :n], self._v[:, :, :n] = keep_k, keep_v
        self._set(n)


class PrefixCache:
    """KV states of token sequences in a radix tree; shared prefixes are stored once.

    `match` returns the KV of the longest cached prefix of a query (an edge may match partially:
    attention is causal, so the first m tokens' KV do not depend on what followed them).
    Least recently used leaves are evicted while more than `max_tokens` tokens are stored.
    """

    def __init__(self, max_tokens: int = DEFAULT_MAX_CACHED_TOKENS):
        self.max_tokens = max_tokens
        self.root = _Node([], [], torch.empty(0), None)
        self.tokens = 0
        self._clock = 0

    def _touch(self, node: _Node) -> None:
        self._clock += 1
        while node is not None:
            node.last_used = self._clock
            node = node.parent

    def _walk(self, tokens: Sequence[int]):
        """Yield (node, matched tokens on its edge) along the longest cached prefix of `tokens`."""
        node, i = self.root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                return
            m = _lcp(child.tokens, tokens[i:i + len(child.tokens)])
            yield child, m
            i += m
            if m < len(child.tokens):
                return
            node = child

    def match_length(self, tokens: Sequence[int]) -> int:
        return sum(m for _, m in self._walk(tokens))

    def match(self, tokens: Sequence[int]) -> tuple[int, KV | None, torch.Tensor | None]:
        """(m, KV of tokens[:m], value-head outputs of tokens[:m]) for the longest cached prefix."""
        path = list(self._walk(tokens))
        if not path:
            return 0, None, None
        self._touch(path[-1][0])
        m = sum(n for _, n in path)
        layers = len(path[0][0].kv)
        kv = [
            (torch.cat([node.kv[l][0][:, :n] for node, n in path], dim=1),
             torch.cat([node.kv[l][1][:, :n] for node, n in path], dim=1))
            for l in range(layers)
        ]
        values = torch.cat([node.values[:n] for node, n in path])
        return m, kv, values

    def insert(self, tokens: Sequence[int], kv: KV, values: torch.Tensor) -> None:
        """Store the KV of `tokens` (kv covers all of them); only the uncached suffix is kept."""
        tokens = list(tokens)
        node, i = self.root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                leaf = _Node(tokens[i:], _slice_kv(kv, i, copy=True), values[i:].clone(), node)
                node.children[tokens[i]] = leaf
                self.tokens += len(leaf.tokens)
                node = leaf
                break
            m = _lcp(child.tokens, tokens[i:i + len(child.tokens)])
            if m < len(child.tokens):
                child = self._split(child, m)
            node, i = child, i + m
        self._touch(node)
        self._evict()

    def _split(self, node: _Node, m: int) -> _Node:
        """Cut node's edge after m tokens; returns the new upper node. Copies so halves free independently."""
        upper = _Node(node.tokens[:m], _slice_kv(node.kv, 0, m, copy=True), node.values[:m].clone(), node.parent)
        upper.last_used = node.last_used
        node.parent.children[node.tokens[0]] = upper
        node.tokens, node.kv, node.values = node.tokens[m:], _slice_kv(node.kv, m, copy=True), node.values[m:].clone()
        node.parent = upper
        upper.children[node.tokens[0]] = node
        return upper

    def _leaves(self) -> list[_Node]:
        out, stack = [], [self.root]
        while stack:
            n = stack.pop()
            if n.children:
                stack.extend(n.children.values())
            elif n is not self.root:
                out.append(n)
        return out

    def _evict(self) -> None:
        while self.tokens > self.max_tokens:
            for leaf in sorted(self._leaves(), key=lambda n: n.last_used):
                del leaf.parent.children[leaf.tokens[0]]
                self.tokens -= len(leaf.tokens)
                if self.tokens <= self.max_tokens:
                    return

    def clear(self) -> None:
        self.root.children.clear()
        self.tokens = 0


# ---- batched forward over rows with different cached prefixes ---------------------------------
@dataclass
class _Row:
    """One sequence to extend: tokens[:cached] have KV `past`; tokens[cached:] are computed."""

    tokens: list[int]
    cached: int
    past: KV | None
    past_values: torch.Tensor | None
    # filled by _extend:
    kv: KV | None = None
    values: torch.Tensor | None = None
    last_logits: torch.Tensor | None = None


@dataclass(eq=False)
class _Decoding:
    """One sample being decoded."""

    prompt: "_Row | None"  # the prompt's row: tokens, KV, values, last logits
    seed_key: int  # sample index k
    generator: torch.Generator | None
    request: "_Request | None" = None
    pair: int = 0  # which (prompt, seed) pair of its request it answers
    tokens: list[int] = field(default_factory=list)
    logprob: float = 0.0
    text: str = ""
    finish: str | None = None


@dataclass(eq=False)
class _Request:
    """One generate() call, waiting for the decode loop to finish its samples."""

    key: tuple  # (stop, temperature, top_p, max_new_tokens): rows decode together only when equal
    texts: list[str]  # distinct prompts
    prompts: list[list[int]]  # the same, as tokens
    pairs: list[tuple[int, int]]  # distinct (prompt index, seed) pairs
    n: int
    samples: list[_Decoding] = field(default_factory=list)
    left: int = 0
    waited: int = 0  # decode steps spent waiting to join a running batch
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def per_pair(self) -> int:
        """Samples decoded per pair: greedy decodes one and copies it n times."""
        return 1 if self.key[1] == 0 else self.n

    @property
    def rows(self) -> int:
        return len(self.pairs) * self.per_pair


class _Batch:
    """The running decode batch: the samples of every admitted request with one sampling key.

    Along the KV axis every row is right-aligned at `width` (left padding is masked out) in buffers
    with room for more columns, so a step writes one column in place. When a sample finishes, the KV
    of everything fed through the model (prompt + all tokens but the last) goes to the prefix cache,
    so scoring the child state only computes what follows. A finished row stays, ignored, until a
    quarter of the rows are finished: dropping rows copies the whole cache, which costs more than
    carrying a few idle rows.
    """

    def __init__(self, key: tuple, window: int):
        self.key, self.window = key, window
        self.samples: list[_Decoding] = []
        self.alive: list[bool] = []
        self.layers: list[_RoomyLayer] = []  # replaced in place, so `cache` always sees the current ones
        self.cache = DynamicCache()
        self.cache.layers = self.layers
        self.mask = self.head_values = self.pos = self.logits = None
        self.width = 0
        self.padded = False

    @property
    def size(self) -> int:
        return len(self.samples)

    def add(self, new: list[_Decoding], room: int, dev) -> None:
        """Append samples: their prompts' KV right-aligned at the width (widened on the left if needed)."""
        W = max(self.width, max(len(smp.prompt.tokens) for smp in new))
        shift = W - self.width
        R, first = len(new), not self.samples
        for layer in range(len(new[0].prompt.kv)):
            k0 = new[0].prompt.kv[layer][0]
            keys = k0.new_zeros(R, k0.shape[0], W, k0.shape[2])
            vals = torch.zeros_like(keys)
            for b, smp in enumerate(new):
                n = len(smp.prompt.tokens)
                keys[b, :, W - n:], vals[b, :, W - n:] = smp.prompt.kv[layer]
            if not first:
                old = self.layers[layer]
                keys = torch.cat([torch.nn.functional.pad(old.keys, (0, 0, shift, 0)), keys])
                vals = torch.cat([torch.nn.functional.pad(old.values, (0, 0, shift, 0)), vals])
                self.layers[layer] = _RoomyLayer(keys, vals, room)
            else:
                self.layers.append(_RoomyLayer(keys, vals, room))
        mask = torch.zeros(R, W, dtype=torch.long, device=dev)
        head_values = torch.zeros(R, W, device=dev)
        for b, smp in enumerate(new):
            n = len(smp.prompt.tokens)
            mask[b, W - n:] = 1
            head_values[b, W - n:] = smp.prompt.values
        pos = torch.tensor([[len(smp.prompt.tokens)] for smp in new], device=dev)  # of the next fed token
        logits = torch.stack([smp.prompt.last_logits for smp in new])
        if not first:
            mask = torch.cat([torch.nn.functional.pad(self.mask[:, :self.width], (shift, 0)), mask])
            head_values = torch.cat([torch.nn.functional.pad(self.head_values[:, :self.width], (shift, 0)), head_values])
            pos, logits = torch.cat([self.pos, pos]), torch.cat([self.logits, logits])
        self.mask, self.head_values = _with_room(mask, room), _with_room(head_values, room)
        self.pos, self.logits, self.width = pos, logits, W
        self.samples += new
        self.alive += [True] * R
        # With no padding (all samples of one prompt: every MCTS expansion) no mask is passed, so
        # attention takes its unmasked path (no 4-D mask built).
        self.padded = not bool(self.mask[:, :W].all())

    def step(self, lm: "LocalLM") -> bool:
        """Sample one token for every live row, retire finished samples, feed the rest. False when empty."""
        stop, temperature, top_p, max_new_tokens = self.key
        live = [b for b in range(self.size) if self.alive[b]]  # rows of `logits`, in order
        toks, lps = lm._pick(self.logits, [self.samples[b] for b in live], temperature, top_p)
        next_tokens = [0] * self.size  # finished rows are fed a dummy token
        for b, tok, lp in zip(live, toks, lps):
            smp = self.samples[b]
            smp.tokens.append(tok)
            smp.logprob += lp
            if lm._finished(smp, tok, stop, max_new_tokens, self.window):
                self.alive[b] = False
                # A live row's KV is its last `fed` columns (left padding before them): views, not
                # copies; insert() copies only what the prefix cache lacks.
                fed, W = len(smp.prompt.tokens) + len(smp.tokens) - 1, self.width
                kv = [(layer.keys[b][:, W - fed:W], layer.values[b][:, W - fed:W]) for layer in self.layers]
                lm.cache.insert(smp.prompt.tokens + smp.tokens[:-1], kv, self.head_values[b, W - fed:W])
                req = smp.request
                req.left -= 1
                if req.left == 0:
                    req.done.set()
            else:
                next_tokens[b] = tok
        n_alive = sum(self.alive)
        if not n_alive:
            return False
        if 4 * (self.size - n_alive) >= self.size:
            keep = [b for b in range(self.size) if self.alive[b]]
            self._select(keep)
            next_tokens = [next_tokens[b] for b in keep]
        dev = self.mask.device
        self.mask[:, self.width] = 1
        ids = torch.tensor(next_tokens, device=dev).unsqueeze(1)
        h, _ = lm.model.hidden(ids, attention_mask=self.mask[:, :self.width + 1] if self.padded else None,
                               past_key_values=self.cache, position_ids=self.pos, use_cache=True)
        self.head_values[:, self.width] = lm.model.values_from_hidden(h)[:, 0]
        self.width, self.pos = self.width + 1, self.pos + 1
        live = [b for b in range(self.size) if self.alive[b]]
        h_live = h[:, -1] if len(live) == self.size else h[torch.tensor(live, device=dev), -1]
        self.logits = lm.model.lm_head(h_live).float()
        lm.usage.decode_tokens += self.size
        return True

    def _select(self, keep: list[int]) -> None:
        """Keep rows `keep` only, and the KV columns they use."""
        idx = torch.tensor(keep, device=self.mask.device)
        cols = self.mask[idx, :self.width].bool().any(0)
        room = self.mask.shape[1] - self.width
        for layer in self.layers:
            layer.select(idx, cols)
        self.mask = _with_room(self.mask[idx, :self.width][:, cols], room)
        self.head_values = _with_room(self.head_values[idx, :self.width][:, cols], room)
        self.pos, self.width = self.pos[idx], int(cols.sum())
        self.samples = [self.samples[b] for b in keep]
        self.alive = [True] * len(keep)
        self.padded = not bool(self.mask[:, :self.width].all())


def _with_room(x: torch.Tensor, room: int) -> torch.Tensor:
    """x [rows, columns] followed by `room` zero columns."""
    return torch.cat([x, x.new_zeros(x.shape[0], room)], 1)


def _sample_seed(seed: int, k: int, prompt: str) -> int:
    """Seed of sample k of `prompt`: independent of which other requests share the batch."""
    digest = hashlib.sha256(f"{seed}:{k}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class LocalLM:
    """Policy and value from one `ValueHeadModel`, computing every token at most once (see module doc)."""

    def __init__(self, model: ValueHeadModel | str | os.PathLike, tokenizer=None, *, dtype=None,
                 device: str | torch.device = "cpu", max_cached_tokens: int | None = None,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
                 max_batch_kv_bytes: int = DEFAULT_MAX_BATCH_KV_BYTES):
        if not isinstance(model, ValueHeadModel):
            model = ValueHeadModel.from_pretrained(model, dtype=dtype, device=device)
        self.model = model.eval()
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if self.tokenizer is None:
            raise ValueError("LocalLM needs a tokenizer (none was saved with the model)")
        if max_cached_tokens is None:
            max_cached_tokens = int(os.environ.get("ALPHAMATH_KV_CACHE_TOKENS", DEFAULT_MAX_CACHED_TOKENS))
        self.cache = PrefixCache(max_cached_tokens)
        self.max_batch_tokens = max_batch_tokens
        self.usage = Usage()
        self.reused_tokens = 0  # tokens served from the prefix cache instead of being recomputed
        self.lock = _FairLock()  # the model, the prefix cache and the tokenizer
        self.eos_ids = self._eos_ids()
        self.max_batch_rows = max_batch_rows
        self.max_batch_kv_bytes = max_batch_kv_bytes
        cfg = self.model.lm.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._kv_bytes_per_slot = (2 * cfg.num_hidden_layers * getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
                                   * head_dim * torch.finfo(self.model.dtype).bits // 8)
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
        limit = len(tokens) - 1 if need_logits else len(tokens)
        m, kv, vals = self.cache.match(tokens[:limit] if need_logits else tokens)
        self.reused_tokens += m
        return _Row(tokens, m, kv, vals)

    def _extend(self, rows: list[_Row]) -> None:
        """Compute the uncached tokens of all rows, in batches bounded by max_batch_tokens."""
        todo = sorted((r for r in rows if r.cached < len(r.tokens)), key=lambda r: len(r.tokens))
        batch: list[_Row] = []
        for row in todo:
            width = max([len(r.tokens) for r in batch] + [len(row.tokens)])
            if batch and (len(batch) + 1) * width > self.max_batch_tokens:
                self._extend_batch(batch)
                batch = []
            batch.append(row)
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
        if M:
            template = next(r.past for r in rows if r.past is not None)
            for layer, (k0, _) in enumerate(template):
                keys = k0.new_zeros(B, k0.shape[0], M, k0.shape[2])
                vals = torch.zeros_like(keys)
                for i, r in enumerate(rows):
                    if r.cached:
                        keys[i, :, M - r.cached:] = r.past[layer][0]
                        vals[i, :, M - r.cached:] = r.past[layer][1]
                cache.update(keys, vals, layer)
        h, cache = self.model.hidden(ids, attention_mask=mask, past_key_values=cache, position_ids=pos, use_cache=True)
        values = self.model.values_from_hidden(h)
        last = torch.tensor([len(r.tokens) - r.cached - 1 for r in rows], device=dev)
        logits = self.model.lm_head(h[torch.arange(B, device=dev), last]).float()
        layers = _cache_layers(cache)
        for i, r in enumerate(rows):
            n = len(r.tokens) - r.cached
            r.kv = [(k[i, :, M - r.cached:M + n], v[i, :, M - r.cached:M + n]) for k, v in layers]
            new_vals = values[i, :n]
            r.values = new_vals if r.past_values is None else torch.cat([r.past_values, new_vals])
            r.last_logits = logits[i]
            self.usage.prefill_tokens += n

    # -- value ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, states: Sequence[str]) -> list[float]:
        """Value head at the last token of each state; cached prefixes are reused, new KV stored."""
        if not states:
            return []
        with self.lock:
            self._count("score")
            unique = {s: None for s in states}
            rows = {}
            for s in unique:
                tokens = self.encode(s)
                if not tokens:
                    raise ValueError("cannot score an empty state")
                rows[s] = self._lookup(tokens, need_logits=False)
            self._extend([r for r in rows.values() if r.cached < len(r.tokens)])
            for r in rows.values():
                if r.kv is not None:
                    self.cache.insert(r.tokens, r.kv, r.values)
                else:
                    r.values = r.past_values
            return [float(rows[s].values[-1]) for s in states]

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

    def _wait_or_lead(self, req: _Request) -> None:
        """Wait for `req`, running the decode loop whenever no other thread is running it.

        The loop runs on a calling thread, not a thread of its own: a second thread doing torch work
        gets its own OpenMP pool, and with more OpenMP threads than cores libgomp cuts spinning to a
        few hundred turns, which made every decode step ~1.6x slower. A caller leads until its own
        request is done, then hands the batch to a waiting caller, so nothing is left running when
        nobody waits (a reloaded model holds no thread)."""
        while True:
            with self._cv:
                while not req.done.is_set() and self._leading:
                    self._cv.wait()
                if req.done.is_set():
                    return
                self._leading = True
            try:
                self._lead(req.done.is_set, req)
            finally:
                with self._cv:
                    self._leading = False
                    self._cv.notify_all()

    def serve(self, until) -> None:
        """Run the decode loop on this thread, for generate() calls made on other threads, until
        `until()` is true. A program that searches (or serves RPCs) on worker threads calls this on
        its main thread, so every decode step runs on one thread and one OpenMP pool (see
        `_wait_or_lead`); on return, waiting callers lead again."""
        with self._cv:
            while self._leading:
                self._cv.wait()
            self._leading = True
        try:
            while not until():
                with self._cv:
                    if self._batch is None and not self._queue:
                        self._cv.wait(0.05)
                        continue
                self._lead(lambda: self._batch is None and not self._queue, None)
        finally:
            with self._cv:
                self._leading = False
                self._cv.notify_all()

    def _lead(self, done, mine: _Request | None) -> None:
        """The decode loop: admits waiting requests at step boundaries and runs one step at a time
        until `done()`; the batch stays in `self._batch` for the next leader."""
        while not done():
            with self._cv:
                admit = self._admissible(self._batch)
            try:
                with self.lock, torch.inference_mode():
                    if admit:
                        self._batch = self._admit(self._batch, admit)
                    if not self._batch.step(self):
                        self._batch = None
            except BaseException as e:  # noqa: BLE001 - the error belongs to the callers
                batch, self._batch = self._batch, None
                failed = {smp.request for smp in (batch.samples if batch else [])} | set(admit)
                for req in failed | ({mine} if mine is not None else set()):
                    if not req.done.is_set():
                        req.error = e
                        req.done.set()
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
            with self._cv:
                self._cv.notify_all()  # wake callers whose requests this step finished

    def _admissible(self, batch: "_Batch | None") -> list[_Request]:
        """Requests to start now (called under _cv). A running batch admits requests with its key when
        they add a quarter of its rows or have waited 8 steps (each admission copies the batch's KV),
        and none once a request with another key waits: the batch then drains, so that one starts."""
        if not self._queue:
            return []
        key = batch.key if batch is not None else self._queue[0].key
        same = [r for r in self._queue if r.key == key]
        if not same or (batch is not None and len(same) < len(self._queue)):
            return []
        if batch is not None:
            for r in same:
                r.waited += 1
            rows = sum(r.rows for r in same)
            if 4 * rows < batch.size and max(r.waited for r in same) < 8:
                return []
        admit, rows = [], batch.size if batch is not None else 0
        width = batch.width if batch is not None else 0
        for r in same:  # an empty batch takes its first request whatever its size
            w = max([width] + [len(t) for t in r.prompts])
            kv_bytes = (rows + r.rows) * (w + key[3]) * self._kv_bytes_per_slot
            if (rows + r.rows > self.max_batch_rows or kv_bytes > self.max_batch_kv_bytes) and (admit or batch is not None):
                break
            admit.append(r)
            rows, width = rows + r.rows, w
        for r in admit:
            self._queue.remove(r)
        return admit

    def _admit(self, batch: "_Batch | None", reqs: list[_Request]) -> "_Batch":
        """Prefill the requests' prompts (only what the prefix cache lacks) and add their samples."""
        stop, temperature, _, max_new_tokens = reqs[0].key
        distinct: dict[tuple, _Row] = {}  # a prompt two requests share is computed once
        for req in reqs:
            for t in req.prompts:
                if tuple(t) not in distinct:
                    distinct[tuple(t)] = self._lookup(t, need_logits=True)
        self._extend(list(distinct.values()))  # one prefill for all admitted requests
        for r in distinct.values():
            self.cache.insert(r.tokens, r.kv, r.values)
        rows_of = [[distinct[tuple(t)] for t in req.prompts] for req in reqs]
        new = []
        for req, rows in zip(reqs, rows_of):
            for j, (pi, sd) in enumerate(req.pairs):
                for k in range(req.per_pair):
                    gen = None
                    if temperature > 0:
                        gen = torch.Generator(device=self.device).manual_seed(_sample_seed(sd, k, req.texts[pi]))
                    req.samples.append(_Decoding(rows[pi], k, gen, req, j))
            req.left = len(req.samples)
            new.extend(req.samples)
        if batch is None:
            batch = _Batch(reqs[0].key, max((len(self.encode(st)) for st in stop), default=0) + 4)
        batch.add(new, max_new_tokens, self.device)
        for r in distinct.values():  # copied into the batch: do not hold a second copy per prompt
            r.kv = r.past = r.values = r.past_values = None
        return batch

    @staticmethod
    def _pick(logits: torch.Tensor, rows: list[_Decoding], temperature: float, top_p: float) -> tuple[list[int], list[float]]:
        """Next token of each row (greedy, or sampled with the row's own generator) and its log-prob
        under the distribution it was drawn from (raw logits when greedy)."""
        if temperature == 0:
            toks = torch.argmax(logits, dim=-1)
            picked = logits.gather(1, toks.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)
            return toks.tolist(), picked.tolist()
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            if top_p < 1.0:
                sorted_p, order = torch.sort(probs, dim=-1, descending=True)
                drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= top_p  # never drops the top token
                probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
            # Inverse-CDF sampling: one uniform per row from the row's own generator (so a sample does
            # not depend on its batch-mates), then one batched search of the cumulative distribution.
            cdf = torch.cumsum(probs, dim=-1)
            u = torch.cat([torch.rand(1, generator=r.generator, device=logits.device) for r in rows])
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


def load_local_lm(model_dir: str | Path | None = None, dtype=None, device="cpu") -> LocalLM:
    """LocalLM on `model_dir` or, by default, the embedded SmolLM2 checkpoint."""
    from alphamath.model import embedded_checkpoint

    return LocalLM(Path(model_dir) if model_dir else embedded_checkpoint(), dtype=dtype, device=device)
