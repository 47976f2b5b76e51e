"""KV storage for decoding: cache layers with room, rows with a cached prefix, the running decode batch
and the samples and requests it holds.

It exists so that decoding writes one KV column per step in place into preallocated buffers
(transformers' DynamicLayer re-allocates the whole cache every token), so that the samples of
every admitted request live in one batch that new requests can join between steps, and so that
the samples of one prompt hold its KV once. The scheduler and LocalLM build on it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from alphamath.lm.radix_cache import KV, PrefixCache
from alphamath.model import decode
from alphamath.model.attention import SharedPrompts


class _RoomyLayer(DynamicLayer):
    """A cache layer with room for `room` more tokens, written in place.

    transformers' DynamicLayer `torch.cat`s the whole cache on every decoded token; on CPU that
    re-allocation was ~45% of decode time. Here `keys`/`values` are views of preallocated buffers.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, n: int):
        """Adopt buffers [B, H, n + room, D] (not copied) whose first `n` columns are filled."""
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._k, self._v = keys, values
        self._set(n)

    @classmethod
    def empty(cls, like: torch.Tensor, rows: int, width: int, room: int) -> "_RoomyLayer":
        """Uninitialised [rows, H, width + room]: the caller writes every row's first `width` columns
        (padding as zeros: masked keys still meet 0 * value, so it must be finite); the room is
        written before it is read. Zeroing only the padding spared a memset of the whole batch."""
        H, D = like.shape[-3], like.shape[-1]
        k = like.new_empty(rows, H, width + room, D)
        return cls(k, torch.empty_like(k), width)

    def put(self, rows: int | slice, start: int, keys: torch.Tensor | None = None,
            values: torch.Tensor | None = None) -> None:
        """Rows `rows`: zeros before `start`, then keys/values (if given) up to the filled width."""
        self._k[rows, :, :start].zero_()
        self._v[rows, :, :start].zero_()
        if keys is not None:
            self._k[rows, :, start:self.n], self._v[rows, :, start:self.n] = keys, values

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

    def select(self, rows: torch.Tensor, start: int) -> None:
        """Keep batch `rows` and the filled columns from `start` on, keeping the room (one copy)."""
        n, room = self.n - start, self._k.shape[2] - self.n
        k = self._k.new_empty(len(rows), self._k.shape[1], n + room, self._k.shape[3])
        v = torch.empty_like(k)
        k[:, :, :n] = self._k[rows, :, start:self.n]
        v[:, :, :n] = self._v[rows, :, start:self.n]
        self._k, self._v = k, v
        self._set(n)


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
    last_hidden: torch.Tensor | None = None  # the trunk's output at the last token (the value head's input)


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

    Each distinct prompt's KV is held once (`shared`: the n samples of an MCTS expansion or an SBS
    beam continue one prompt), and each row holds only the columns it has fed since its prompt,
    right-aligned at `width` (left padding masked out) in buffers with room for more, so a step
    writes one column in place. A step attends each row to its prompt's shared KV and to its own
    columns (attention.shared_prompt_attention). When a sample finishes, the KV of everything fed
    through the model (prompt + all tokens but the last) goes to the prefix cache, so scoring the
    child state only computes what follows. A finished row stays, ignored, until an eighth of the
    rows are finished (in a batch of up to 8, at once): dropping rows copies the rows' KV, while
    every idle row carried is a token computed for nothing each step.
    """

    def __init__(self, key: tuple, window: int, tiles: bool = False):
        """`tiles`: hold the prompts' KV also as decode.prompt_tiles (decode attention on AMX tiles)."""
        self.key, self.window, self.tiles = key, window, tiles
        self.samples: list[_Decoding] = []
        self.alive: list[bool] = []
        self.layers: list[_RoomyLayer] = []  # own columns; replaced in place, so `cache` sees the current ones
        self.cache = DynamicCache()
        self.cache.layers = self.layers
        self.mask = self.head_values = self.pos = self.logits = None
        self.width = 0  # own columns of the widest row
        self.padded = False
        self.prompts: list[_Row] = []  # distinct prompts (group g), their tokens and values
        self.group_of: list[int] = []  # each row's prompt
        self.prompt_len = 0  # columns of the shared prompt buffers
        self.shared: SharedPrompts | None = None

    @property
    def size(self) -> int:
        return len(self.samples)

    def add(self, new: list[_Decoding], room: int, dev) -> None:
        """Append samples: their prompts' KV joins the shared prompts, once per distinct prompt; their
        own columns start empty (left padding at the current width)."""
        fresh = list({id(smp.prompt): smp.prompt for smp in new}.values())
        G0, R, old = len(self.prompts), len(new), self.size
        group = {id(row): G0 + j for j, row in enumerate(fresh)}
        L = max([self.prompt_len] + [len(row.tokens) for row in fresh])
        keys, values, layers = [], [], []
        for layer in range(len(fresh[0].kv)):
            like = fresh[0].kv[layer][0]  # [Hk, n, D]
            k = like.new_zeros(G0 + len(fresh), like.shape[0], L, like.shape[-1])  # zeros: masked keys still meet 0 * value
            v = torch.zeros_like(k)
            if G0:
                k[:G0, :, :self.prompt_len] = self.shared.keys[layer]
                v[:G0, :, :self.prompt_len] = self.shared.values[layer]
            for j, row in enumerate(fresh):
                n = len(row.tokens)
                k[G0 + j, :, :n], v[G0 + j, :, :n] = row.kv[layer]
            keys.append(k)
            values.append(v)
            # One buffer for old and new rows' own columns: old rows copied, new rows all padding.
            roomy = _RoomyLayer.empty(like, old + R, self.width, room)
            if old:
                roomy.put(slice(0, old), 0, self.layers[layer].keys, self.layers[layer].values)
            roomy.put(slice(old, old + R), self.width)
            layers.append(roomy)
        self.layers[:] = layers  # in place: `cache` holds this list
        self.prompts += fresh
        self.prompt_len = L
        self.group_of += [group[id(smp.prompt)] for smp in new]
        tiles = None  # the old prompts' tiles are kept: only the fresh prompts are laid out
        if self.tiles:
            tiles = [decode.prompt_tiles(k[G0:], v[G0:]) for k, v in zip(keys, values)]
            if G0 and self.shared.tiles is not None:
                tiles = [_join_tiles(a, b) for a, b in zip(self.shared.tiles, tiles)]
        self._share(keys, values, dev, tiles)
        W = self.width
        pos = torch.tensor([[len(smp.prompt.tokens)] for smp in new], device=dev)  # of the next fed token
        logits = torch.stack([smp.prompt.last_logits for smp in new])
        mask, head_values = torch.zeros(R, W, dtype=torch.long, device=dev), torch.zeros(R, W, device=dev)
        if old:
            mask, head_values = torch.cat([self.mask[:, :W], mask]), torch.cat([self.head_values[:, :W], head_values])
            pos, logits = torch.cat([self.pos, pos]), torch.cat([self.logits, logits])
        self.mask, self.head_values = _with_room(mask, room), _with_room(head_values, room)
        self.pos, self.logits = pos, logits
        self.samples += new
        self.alive += [True] * R
        # With no padding (rows that started together: every MCTS expansion) no mask is passed.
        self.padded = not bool(self.mask[:, :W].all())

    def _share(self, keys: list, values: list, dev, tiles: list | None) -> None:
        """SharedPrompts over prompt buffers `keys`/`values` (group g = self.prompts[g]) and, where
        decode attention runs on AMX tiles, their decode.prompt_tiles per layer."""
        G, B, L = len(self.prompts), len(self.group_of), self.prompt_len
        rows = [[] for _ in range(G)]
        for b, g in enumerate(self.group_of):
            rows[g].append(b)
        R = max(len(r) for r in rows)
        members = torch.empty((G, R), dtype=torch.long)
        slot = torch.empty(B, dtype=torch.long)
        for g, r in enumerate(rows):
            members[g] = torch.tensor(r + [r[0]] * (R - len(r)), dtype=torch.long)
            slot[r] = g * R + torch.arange(len(r))
        lens = torch.tensor([len(p.tokens) for p in self.prompts], device=dev)
        mask = torch.zeros(G, 1, 1, L, dtype=keys[0].dtype, device=dev)
        mask.masked_fill_((torch.arange(L, device=dev)[None] >= lens[:, None])[:, None, None], float("-inf"))
        one_each = rows == [[b] for b in range(B)]  # row b continues prompt b: nothing to gather
        self.shared = SharedPrompts(keys, values, mask, members.to(dev), slot.to(dev), one_each, lens,
                                    torch.tensor(self.group_of, dtype=torch.long, device=dev), tiles)

    def step(self, lm) -> bool:
        """Sample one token for every live row, retire finished samples, feed the rest. False when empty.
        `lm` is the LocalLM that runs the batch: its model, sampler, stop test, prefix cache and usage."""
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
                self._store(b, lm.cache)
                req = smp.request
                req.left -= 1
                if req.left == 0:
                    req.done.set()
            else:
                next_tokens[b] = tok
        n_alive = sum(self.alive)
        if not n_alive:
            return False
        if 8 * (self.size - n_alive) >= self.size:
            keep = [b for b in range(self.size) if self.alive[b]]
            self._select(keep)
            next_tokens = [next_tokens[b] for b in keep]
        dev = self.mask.device
        self.mask[:, self.width] = 1
        ids = torch.tensor(next_tokens, device=dev).unsqueeze(1)
        h, _ = lm._hidden(ids, attention_mask=self.mask[:, :self.width + 1] if self.padded else None,
                          past_key_values=self.cache, position_ids=self.pos, use_cache=True, prompts=self.shared)
        self.head_values[:, self.width] = lm.model.values_from_hidden(h)[:, 0]
        self.width, self.pos = self.width + 1, self.pos + 1
        live = [b for b in range(self.size) if self.alive[b]]
        h_live = h[:, -1] if len(live) == self.size else h[torch.tensor(live, device=dev), -1]
        self.logits = lm._logits(h_live)
        lm.usage.decode_tokens += self.size
        return True

    def _store(self, b: int, cache: PrefixCache) -> None:
        """Put finished row b's KV (prompt + every fed token) into the prefix cache. The prompt went
        there at admission, so normally only the row's own columns (views, not copies) are passed;
        if it was evicted since, it is joined from the shared buffers."""
        smp, W, g = self.samples[b], self.width, self.group_of[b]
        P, fed = len(smp.prompt.tokens), len(smp.tokens) - 1
        tokens = smp.prompt.tokens + smp.tokens[:-1]
        own = [(layer.keys[b][:, W - fed:W], layer.values[b][:, W - fed:W]) for layer in self.layers]
        own_values = self.head_values[b, W - fed:W]
        if cache.match_length(tokens[:P]) == P:
            cache.insert(tokens, own, own_values, start=P)
            return
        kv = [(torch.cat([k[g, :, :P], ok], 1), torch.cat([v[g, :, :P], ov], 1))
              for k, v, (ok, ov) in zip(self.shared.keys, self.shared.values, own)]
        cache.insert(tokens, kv, torch.cat([self.prompts[g].values, own_values]))

    def _select(self, keep: list[int]) -> None:
        """Keep rows `keep` only, the own columns they use and the prompts they continue."""
        dev = self.mask.device
        idx = torch.tensor(keep, device=dev)
        # Rows are right-aligned, so the columns any kept row uses are one range [start, width).
        start = self.width - int(self.mask[idx, :self.width].sum(1).max())
        room = self.mask.shape[1] - self.width
        for layer in self.layers:
            layer.select(idx, start)
        self.mask = _with_room(self.mask[idx, start:self.width], room)
        self.head_values = _with_room(self.head_values[idx, start:self.width], room)
        self.pos, self.width = self.pos[idx], self.width - start
        self.samples = [self.samples[b] for b in keep]
        self.alive = [True] * len(keep)
        self.padded = not bool(self.mask[:, :self.width].all())
        used = sorted({self.group_of[b] for b in keep})
        renumber = {g: j for j, g in enumerate(used)}
        self.group_of = [renumber[self.group_of[b]] for b in keep]
        keys, values, tiles = self.shared.keys, self.shared.values, self.shared.tiles
        if len(used) < len(self.prompts):  # drop the prompts no row continues, and their columns
            self.prompts = [self.prompts[g] for g in used]
            self.prompt_len = max(len(p.tokens) for p in self.prompts)
            gi = torch.tensor(used, device=dev)
            keys = [k[gi, :, :self.prompt_len].contiguous() for k in keys]
            values = [v[gi, :, :self.prompt_len].contiguous() for v in values]
            if tiles is not None:  # their columns past the longest kept prompt stay: zeros, never read
                tiles = [(kt[gi], vt[gi]) for kt, vt in tiles]
        self._share(keys, values, dev, tiles)


def _join_tiles(old: tuple, new: tuple) -> tuple:
    """decode.prompt_tiles of two sets of prompts as one: the old groups then the new, both padded with
    zero columns to the longer (kt [G, Hk, D/2, Lq, 2] along Lq, vt [G, Hk, Lq/2, D, 2] along Lq/2)."""
    (ok, ov), (nk, nv) = old, new
    Lq = max(ok.shape[3], nk.shape[3])

    def pad(kt, vt):
        extra = Lq - kt.shape[3]
        if not extra:
            return kt, vt
        return (torch.nn.functional.pad(kt, (0, 0, 0, extra)), torch.nn.functional.pad(vt, (0, 0, 0, 0, 0, extra // 2)))

    (ok, ov), (nk, nv) = pad(ok, ov), pad(nk, nv)
    return torch.cat([ok, nk]), torch.cat([ov, nv])


def _with_room(x: torch.Tensor, room: int) -> torch.Tensor:
    """x [rows, columns] followed by `room` zero columns."""
    return torch.cat([x, x.new_zeros(x.shape[0], room)], 1)
