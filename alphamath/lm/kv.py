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

from alphamath.lm.lookup import DRAFT_MAX, YIELD_PRIOR, Lookup, draft_length
from alphamath.lm.radix_cache import KV, PrefixCache
from alphamath.model import decode
from alphamath.model.attention import SharedPrompts

ROOT_MIN = 64  # tokens: a shorter shared prefix is not held apart as a batch's root (_Batch)


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

    def put_parts(self, row: int, start: int, parts: list) -> None:
        """Row `row`: zeros before `start`, then each part's (keys, values) in turn (a cached past's edges,
        PrefixCache.match_parts), filling the columns up to the filled width."""
        self.put(row, start)
        for k, v in parts:
            n = k.shape[-2]
            self._k[row, :, start:start + n], self._v[row, :, start:start + n] = k, v
            start += n

    def _set(self, n: int) -> None:
        self.n = n
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The K and V buffers [B, H, n + room, D] and the filled width n, for a kernel that writes the
        next columns in place (decode.decode_layers); `advance` then counts them."""
        return self._k, self._v, self.n

    def advance(self, m: int) -> None:
        """Count m more columns as filled: they were written into `buffers()` in place."""
        if self.n + m > self._k.shape[2]:
            raise RuntimeError(f"KV buffer out of room: {self.n} + {m} > {self._k.shape[2]}")
        self._set(self.n + m)

    def update(self, key_states, value_states, cache_kwargs=None):
        n, m = self.n, key_states.shape[-2]
        if n + m > self._k.shape[2]:  # every admission leaves max_new_tokens of room: a bug if reached
            raise RuntimeError(f"KV buffer out of room: {n} + {m} > {self._k.shape[2]}")
        self._k[:, :, n:n + m], self._v[:, :, n:n + m] = key_states, value_states
        self._set(n + m)
        return self.keys, self.values

    def gather(self, rows: torch.Tensor, columns: torch.Tensor | slice, room: int) -> None:
        """Keep batch `rows`, row r holding its columns `columns[r]` [n] in order, then `room` (one copy). `columns`
        may be one slice that every row keeps (no holes): then the rows are picked by index_select. Otherwise each
        (row, head, column)'s D values are picked by one index_select over the buffer's D-vectors. Compacting a
        40-row batch's 60 K/V buffers took ~17 ms by torch's two-index gather, ~3 by the slice and ~6 by the
        D-vectors (s49)."""
        H, C, D = self._k.shape[1:]
        n = columns.stop - columns.start if isinstance(columns, slice) else columns.shape[1]
        k = self._k.new_empty(len(rows), H, n + room, D)
        v = torch.empty_like(k)
        if isinstance(columns, slice):
            k[:, :, :n] = self._k[:, :, columns].index_select(0, rows)
            v[:, :, :n] = self._v[:, :, columns].index_select(0, rows)
        else:
            heads = torch.arange(H, device=rows.device)
            at = ((rows[:, None, None] * H + heads[None, :, None]) * C + columns[:, None, :]).reshape(-1)
            k[:, :, :n] = self._k.reshape(-1, D).index_select(0, at).view(len(rows), H, n, D)
            v[:, :, :n] = self._v.reshape(-1, D).index_select(0, at).view(len(rows), H, n, D)
        self._k, self._v = k, v
        self._set(n)


@dataclass
class _Row:
    """One sequence to extend: tokens[:cached] have KV `past` (per layer, the cache's edges in order:
    PrefixCache.match_parts); tokens[cached:] are computed."""

    tokens: list[int]
    cached: int
    past: KV | None
    past_values: torch.Tensor | None
    last_logits_needed: bool = False  # looked up leaving its last token to compute (LocalLM._lookup)
    # filled by _extend:
    kv: KV | None = None
    values: torch.Tensor | None = None
    last_logits: torch.Tensor | None = None
    last_hidden: torch.Tensor | None = None  # the trunk's output at the last token (the value head's input)
    lookup: Lookup | None = None  # the prompt's n-gram index, made by the first sample that drafts


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
    draft: list[int] = field(default_factory=list)  # draft tokens fed after the last sampled one, last step
    fed: int = 0  # columns the last step gave this row (1 + the draft's padded length; 0: not fed yet)
    lookup: Lookup | None = None  # prompt + tokens, indexed for drafts

    def next_draft(self, k: int) -> list[int]:
        """Up to k draft tokens for what follows this sample's tokens (lookup.py)."""
        if self.lookup is None:
            if self.prompt.lookup is None:
                self.prompt.lookup = Lookup(list(self.prompt.tokens))
            self.lookup = self.prompt.lookup.fork(list(self.prompt.tokens))
        self.lookup.tokens += self.tokens[len(self.lookup.tokens) - len(self.prompt.tokens):]  # the new ones
        return self.lookup.draft(k)


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

    The prompts live in a slab of slots with room (`_slab_size`): an admission writes its new prompts
    into free slots and a prompt no row continues frees its slot, so neither copies the prompts that
    stay. Rebuilding the whole prompt set at every admission and drop had cost 30% of the decode
    loop's time at 16 concurrent searches (session 24). The slab grows, and shrinks, by a copy.

    The root (where the C++ kernels compute decode attention: decode.cpp in bf16, avx2.cpp in fp32):
    every question's prompt opens with the same instructions and worked examples (~340 of a prompt's
    ~420 tokens), and a slot holding each prompt whole made a step read that prefix's KV once per
    prompt: at 16 searches, 16 times per layer, from memory. A batch takes as its root the prefix that
    every cached sequence shares when it starts (`PrefixCache.branch_length`), holds its KV once
    (`root_tiles`, laid out as the kernel reads it: decode.cpp's tiles, so no per-step transposing of
    its keys; in fp32 the K/V as they are), and a prompt that continues it holds only the rest in its
    slot; the kernel reads the root from cache for every prompt after the first. A prompt that does not
    continue the root is held whole.
    """

    def __init__(self, key: tuple, window: int, tiles: bool = False, root: int = 0):
        """`tiles`: hold the prompts' KV also as decode.prompt_tiles (decode attention on AMX tiles);
        `root` (where the C++ kernels compute decode attention): the tokens of the root this batch holds once,
        taken from its first prompt that continues past them (under ROOT_MIN tokens it is not worth one)."""
        self.key, self.window, self.tiles = key, window, tiles
        self.root = root if root >= ROOT_MIN else 0
        self.root_tokens: list[int] = []
        self.root_kv: list | None = None  # per layer (keys, values) [Hk, root, D] (_store joins them)
        self.root_tiles: list | None = None  # per layer decode.prompt_tiles of root_kv (in fp32: root_kv)
        self.samples: list[_Decoding] = []
        self.alive: list[bool] = []
        self.layers: list[_RoomyLayer] = []  # own columns; replaced in place, so `cache` sees the current ones
        self.cache = DynamicCache()
        self.cache.layers = self.layers
        self.mask = self.head_values = self.pos = self.logits = None
        self.first: list[int] = []  # live row i's logits at position j: logits[first[i] + j]
        self.width = 0  # own columns of the widest row
        self.padded = False
        self.prompts: list[_Row | None] = []  # slot g: the prompt held there, None when the slot is free
        self.group_of: list[int] = []  # each row's prompt slot
        # The slab, per layer [slots, Hk, columns, D]: prompt g in columns [0, len g), zeros after.
        self.keys: list | None = None
        self.values: list | None = None
        self.slab_tiles: list | None = None  # per layer decode.prompt_tiles of keys/values (columns = Lq)
        self.shared: SharedPrompts | None = None
        self.draft_yield = YIELD_PRIOR  # tokens accepted per draft position, a running mean (lookup.draft_length)

    @property
    def size(self) -> int:
        return len(self.samples)

    @property
    def live_prompts(self) -> int:
        return sum(p is not None for p in self.prompts)

    @property
    def prompt_len(self) -> int:
        """Slot columns of the longest prompt held (what follows the root, for a prompt that continues it)."""
        return max((len(p.tokens) - self._start(p) for p in self.prompts if p is not None), default=0)

    def _start(self, row: _Row) -> int:
        """Tokens of `row`'s prompt that the root holds: the root's, if the prompt continues past it, else 0
        (a prompt that is the root and no more is held whole: no slot is left empty)."""
        R = self.root
        return R if self.root_kv is not None and len(row.tokens) > R and row.tokens[:R] == self.root_tokens else 0

    def _take_root(self, rows: list[_Row]) -> None:
        """Hold the root's KV once, from the first of `rows` that continues past it (none: no root)."""
        R = self.root
        first = next((row for row in rows if len(row.tokens) > R), None)
        if first is None:
            self.root = 0
            return
        self.root_tokens = first.tokens[:R]
        self.root_kv = [(k[:, :R].clone(), v[:, :R].clone()) for k, v in first.kv]
        # as the kernel reads it: decode.cpp's tiles in bf16, avx2.cpp's the K/V as they are in fp32
        self.root_tiles = (self.root_kv if self.root_kv[0][0].dtype == torch.float32 else
                           [tuple(t[0] for t in decode.prompt_tiles(k[None], v[None])) for k, v in self.root_kv])

    def add(self, new: list[_Decoding], room: int, dev, root: int = 0) -> None:
        """Append samples: their prompts' KV joins the slab, once per distinct prompt, in free slots;
        their own columns start empty (left padding at the current width). `root`: the prefix the new
        prompts share with what the prefix cache holds (its first branch), which a running batch without a
        root takes as its root (`_late_root`)."""
        fresh = list({id(smp.prompt): smp.prompt for smp in new}.values())
        if self.keys is None and self.root:
            self._take_root(fresh)
        elif self.keys is not None and self.root_kv is None and root >= ROOT_MIN:
            self._late_root(root, fresh)
        R, old = len(new), self.size
        live, longest = self.live_prompts + len(fresh), max(len(row.tokens) - self._start(row) for row in fresh)
        if not self.fits(live, longest):
            self._regrow(live, max(self.prompt_len, longest), fresh[0].kv)
        slots = [g for g, p in enumerate(self.prompts) if p is None][:len(fresh)]
        self._write(slots, fresh)
        group = {id(row): g for g, row in zip(slots, fresh)}
        layers = []
        for layer in range(len(fresh[0].kv)):
            # One buffer for old and new rows' own columns: old rows copied, new rows all padding.
            roomy = _RoomyLayer.empty(fresh[0].kv[layer][0], old + R, self.width, room)
            if old:
                roomy.put(slice(0, old), 0, self.layers[layer].keys, self.layers[layer].values)
            roomy.put(slice(old, old + R), self.width)
            layers.append(roomy)
        self.layers[:] = layers  # in place: `cache` holds this list
        self.group_of += [group[id(smp.prompt)] for smp in new]
        self._share(dev)
        W = self.width
        pos = torch.tensor([[len(smp.prompt.tokens)] for smp in new], device=dev)  # of the next fed token
        logits = torch.stack([smp.prompt.last_logits for smp in new])  # [R, V]: each new row's position 0
        mask, head_values = torch.zeros(R, W, dtype=torch.long, device=dev), torch.zeros(R, W, device=dev)
        first = list(range(R))
        if old:
            mask, head_values = torch.cat([self.mask[:, :W], mask]), torch.cat([self.head_values[:, :W], head_values])
            first = self.first + [len(self.logits) + r for r in first]
            pos, logits = torch.cat([self.pos, pos]), torch.cat([self.logits, logits])
        self.mask, self.head_values = _with_room(mask, room), _with_room(head_values, room)
        self.pos, self.logits, self.first = pos, logits, first
        self.samples += new
        self.alive += [True] * R
        # With no padding (rows that started together: every MCTS expansion) no mask is passed.
        self.padded = not bool(self.mask[:, :W].all())

    def _late_root(self, root: int, rows: list[_Row]) -> None:
        """Take a root in a running batch. A batch that began with one prompt while the prefix cache held
        nothing else saw no branch, so it held that prompt whole and every prompt that joined it too: 16
        concurrent searches' prompts (~400 tokens, 338 of them shared) then each read their own copy of the
        shared prefix in every layer of every step. The root comes from `rows` (as `_take_root`), and each
        held prompt that continues it moves down its slot by the root's length (its tiles laid out again)."""
        self.root = root
        self._take_root(rows)
        if self.root_kv is None:
            return
        for g, p in enumerate(self.prompts):
            s = self._start(p) if p is not None else 0
            if not s:
                continue
            n = len(p.tokens) - s
            for layer, (k, v) in enumerate(zip(self.keys, self.values)):
                k[g, :, :n], v[g, :, :n] = k[g, :, s:s + n].clone(), v[g, :, s:s + n].clone()
                k[g, :, n:], v[g, :, n:] = 0, 0
                if self.tiles:
                    kt, vt = self.slab_tiles[layer]
                    decode.lay_tiles(k[g, :, :n], v[g, :, :n], kt[g], vt[g])

    def fits(self, live: int, length: int) -> bool:
        """Does the slab hold `live` prompts of up to `length` tokens as it is?"""
        return self.keys is not None and live <= len(self.prompts) and length <= self.keys[0].shape[2]

    def _regrow(self, live: int, length: int, like: list | None = None) -> None:
        """A new slab for `live` prompts of up to `length` tokens (_slab_size), holding the current
        prompts in its first slots (rows are renumbered); `like`: per-layer KV of the dtype and heads to
        allocate (default: the slab's own)."""
        if like is None:
            like = [(k[0], v[0]) for k, v in zip(self.keys, self.values)]
        slots, columns = _slab_size(live, length)
        held = [g for g, p in enumerate(self.prompts) if p is not None]
        idx = torch.tensor(held, dtype=torch.long)
        keys, values, tiles = [], [], []
        h = len(held)
        for layer, (k0, _) in enumerate(like):
            Hk, D = k0.shape[0], k0.shape[-1]
            # Uninitialised: _write fills a free slot whole, and slots are taken lowest first, so no slot
            # is read before it is written; capacity never used is never touched (no RSS).
            k, v = k0.new_empty(slots, Hk, columns, D), k0.new_empty(slots, Hk, columns, D)
            if held:
                c = min(columns, self.keys[layer].shape[2])  # held prompts fit in both
                k[:h, :, :c], v[:h, :, :c] = self.keys[layer][idx, :, :c], self.values[layer][idx, :, :c]
                k[:h, :, c:], v[:h, :, c:] = 0, 0
            keys.append(k)
            values.append(v)
            if self.tiles:  # prompt_tiles' layouts, Lq = columns (a multiple of 32)
                kt, vt = k0.new_empty(slots, Hk, D // 2, columns, 2), k0.new_empty(slots, Hk, columns // 2, D, 2)
                if held:
                    okt, ovt = self.slab_tiles[layer]
                    kt[:h, :, :, :c], vt[:h, :, :c // 2] = okt[idx, :, :, :c], ovt[idx, :, :c // 2]
                    kt[:h, :, :, c:], vt[:h, :, c // 2:] = 0, 0
                tiles.append((kt, vt))
        self.keys, self.values, self.slab_tiles = keys, values, tiles if self.tiles else None
        renumber = {g: j for j, g in enumerate(held)}
        self.prompts = [self.prompts[g] for g in held] + [None] * (slots - len(held))
        self.group_of = [renumber[g] for g in self.group_of]

    def _write(self, slots: list[int], rows: list[_Row]) -> None:
        """Prompts `rows` into free slab slots `slots`: their KV, zeros after it, and their tiles, written
        in place (laying the tiles out apart and then copying them had doubled an admission's cost)."""
        for g, row in zip(slots, rows):
            s = self._start(row)
            n = len(row.tokens) - s
            for layer, (k, v) in enumerate(row.kv):
                k, v = k[:, s:], v[:, s:]
                self.keys[layer][g, :, :n], self.values[layer][g, :, :n] = k, v
                self.keys[layer][g, :, n:], self.values[layer][g, :, n:] = 0, 0  # a freed slot's old prompt
                if self.tiles:  # decode.prompt_tiles' layouts (torch's strided copies were slower)
                    decode.lay_tiles(k, v, self.slab_tiles[layer][0][g], self.slab_tiles[layer][1][g])
            self.prompts[g] = row

    def _share(self, dev) -> None:
        """SharedPrompts over the slab's slots up to the last one held (row b continues slot
        group_of[b]; a free slot below it has no rows and is never read back)."""
        G = 1 + max(g for g, p in enumerate(self.prompts) if p is not None)
        B, L = len(self.group_of), self.keys[0].shape[2]
        rows = [[] for _ in range(G)]
        for b, g in enumerate(self.group_of):
            rows[g].append(b)
        R = max(len(r) for r in rows)
        members = torch.empty((G, R), dtype=torch.long)
        slot = torch.empty(B, dtype=torch.long)
        for g, r in enumerate(rows):
            members[g] = torch.tensor((r + [r[0]] * (R - len(r))) if r else [0] * R, dtype=torch.long)
            if r:
                slot[r] = g * R + torch.arange(len(r))
        starts = [self._start(p) if p is not None else 0 for p in self.prompts[:G]]
        lens = torch.tensor([len(p.tokens) - s if p is not None else 0 for p, s in zip(self.prompts[:G], starts)],
                            device=dev)
        root_len = torch.tensor(starts, device=dev) if self.root_kv is not None else None
        mask = torch.zeros(G, 1, 1, L, dtype=self.keys[0].dtype, device=dev)
        mask.masked_fill_((torch.arange(L, device=dev)[None] >= lens[:, None])[:, None, None], float("-inf"))
        one_each = rows == [[b] for b in range(B)]  # row b continues prompt b: nothing to gather
        tiles = [(kt[:G], vt[:G]) for kt, vt in self.slab_tiles] if self.slab_tiles is not None else None
        self.shared = SharedPrompts([k[:G] for k in self.keys], [v[:G] for v in self.values], mask,
                                    members.to(dev), slot.to(dev), one_each, lens,
                                    torch.tensor(self.group_of, dtype=torch.long, device=dev), tiles,
                                    self.root_tiles if root_len is not None else None, root_len)

    def step(self, lm) -> bool:
        """Sample every live row's next tokens, retire finished samples, feed the rest. False when empty.
        `lm` is the LocalLM that runs the batch: its model, sampler, stop test, prefix cache and usage.

        Drafts (lookup.py): where the batch has few rows, each row is fed its last sampled token and up
        to DRAFT_MAX draft tokens in one forward (FastLlama.verify), which yields logits at every fed
        position. The next step samples position 0 with the row's own next uniform, as always; while
        the token drawn equals the draft token fed at the next position, that position's logits are
        the ones a plain step would have computed next, so it samples there too, and so on. The tokens
        and log-probs are those of one-token steps; a rejected draft's columns stay as holes (masked)
        until the rows are next compacted (`_select`). Such a step is ragged: each live row feeds 1 + its own
        draft's length, finished rows nothing, and the step's columns a row did not feed are holes too, so no
        position is computed only to pad a row to the longest draft (s38: padding had kept the token ratio
        above 1.1 under a rule that drafted less)."""
        stop, temperature, top_p, max_new_tokens = self.key
        live = [b for b in range(self.size) if self.alive[b]]  # rows of `logits`, in order
        next_tokens = [0] * self.size  # finished rows are fed a dummy token
        todo, j, holes = list(range(len(live))), 0, False
        drafted, accepted_now = sum(len(self.samples[b].draft) for b in live), 0
        while todo:  # position j of the rows whose samples so far equalled their drafts
            rows = [live[i] for i in todo]
            at = [self.first[i] + j for i in todo]
            contiguous = at[-1] - at[0] == len(at) - 1  # at is increasing: a view, not a copy of the rows' logits
            logits = self.logits[at[0]:at[-1] + 1] if contiguous else self.logits[at]
            toks, lps = lm._pick(logits, [self.samples[b] for b in rows], temperature, top_p)
            accepted = []
            for i, b, tok, lp in zip(todo, rows, toks, lps):
                smp = self.samples[b]
                smp.tokens.append(tok)
                smp.logprob += lp
                finished = lm._finished(smp, tok, stop, max_new_tokens, self.window)
                if not finished and j < len(smp.draft) and tok == smp.draft[j]:
                    accepted.append(i)
                    accepted_now += 1
                    continue
                if smp.fed > j + 1:  # the draft's columns past position j hold rejected tokens
                    self.mask[b, self.width - smp.fed + j + 1:self.width] = 0
                    holes = True
                self.pos[b] += j
                if not finished:
                    next_tokens[b] = tok
                    continue
                self.alive[b] = False
                self._store(b, lm.cache)
                req = smp.request
                req.left -= 1
                if req.left == 0:
                    req.done.set()
            todo, j = accepted, j + 1
        self.padded = self.padded or holes
        if drafted:
            lm.usage.draft_accepted += accepted_now
            self.draft_yield += 0.25 * (accepted_now / drafted - self.draft_yield)
        n_alive = sum(self.alive)
        if not n_alive:
            return False
        k = 0
        drafting = n_alive < lm.draft_rows  # else no draft fits: skip the lookups (they catch up)
        for b, smp in enumerate(self.samples):  # what the lookup offers each live row, then how much of it to feed
            live_row = drafting and self.alive[b]
            smp.draft = smp.next_draft(min(DRAFT_MAX, max_new_tokens - len(smp.tokens) - 1)) if live_row else []
        if drafting:
            k = draft_length([len(smp.draft) for b, smp in enumerate(self.samples) if self.alive[b]],
                             self.draft_yield, lm.row_cost, lm.draft_rows)
        if 8 * (self.size - n_alive) >= self.size or self.width + 1 + k > self.mask.shape[1]:
            keep = [b for b in range(self.size) if self.alive[b]]
            self._select(keep, 1 + k)
            next_tokens = [next_tokens[b] for b in keep]
        for smp in self.samples:
            smp.draft = smp.draft[:k]
        T = 1 + max((len(smp.draft) for smp in self.samples), default=0)
        dev, W, B = self.mask.device, self.width, self.size
        if T == 1:
            self.mask[:, W] = 1
            ids = torch.tensor(next_tokens, device=dev).unsqueeze(1)
            h, _ = lm._hidden(ids, attention_mask=self.mask[:, :W + 1] if self.padded else None,
                              past_key_values=self.cache, position_ids=self.pos, use_cache=True, prompts=self.shared)
            self.head_values[:, W:W + 1] = lm.model.values_from_hidden(h)
            live = [b for b in range(B) if self.alive[b]]
            h = (h if len(live) == B else h[torch.tensor(live, device=dev)]).reshape(len(live), -1)
            self.first = list(range(len(live)))
        else:
            # Ragged: each live row is fed its last token and its own draft, no padding to the longest one; the
            # columns no query feeds (a shorter draft's, a finished row's) stay masked holes.
            own_of, col, ids = [], [], []
            self.first = []
            for b, smp in enumerate(self.samples):
                if self.alive[b]:
                    self.first.append(len(own_of))
                    ids += [next_tokens[b]] + smp.draft
                    own_of += [b] * (1 + len(smp.draft))
                    col += range(1 + len(smp.draft))
            own_of, col = torch.tensor(own_of, device=dev), torch.tensor(col, device=dev)
            self.mask[:, W:W + T] = 0
            self.mask[own_of, W + col] = 1
            own = self.mask[own_of, :W].bool()
            causal = torch.arange(T, device=dev)[None] <= col[:, None]
            h = lm._fast.verify(torch.tensor(ids, device=dev), own_of, col, self.pos[own_of, 0] + col,
                                torch.cat([own, causal], 1), self.cache, self.shared, T)
            self.head_values[:, W:W + T] = 0
            self.head_values[own_of, W + col] = lm.model.values_from_hidden(h)
            self.padded = self.padded or len(own_of) < B * T
        for smp in self.samples:
            smp.fed = T
        self.width, self.pos = W + T, self.pos + 1
        self.logits = lm._logits(h, step=True)  # [queries, V]: live row i's position j at row first[i] + j
        lm.usage.decode_tokens += B if T == 1 else len(h)
        lm.usage.draft_tokens += len(h) - len(self.first) if T > 1 else 0
        return True

    def _store(self, b: int, cache: PrefixCache) -> None:
        """Put finished row b's KV (prompt + every fed token) into the prefix cache. The prompt went
        there at admission, so normally only the row's own columns (views, not copies) are passed;
        if it was evicted since, it is joined from the slab."""
        smp, W, g = self.samples[b], self.width, self.group_of[b]
        P, fed = len(smp.prompt.tokens), len(smp.tokens) - 1
        tokens = smp.prompt.tokens + smp.tokens[:-1]
        cols = self.mask[b, :W].nonzero().squeeze(1)  # the columns in use: fed tokens, not a draft's holes
        if len(cols) != fed:
            raise RuntimeError(f"row {b}: {len(cols)} own columns in use for {fed} fed tokens")
        if fed and int(cols[0]) == W - fed:  # no holes: views, not copies
            cols = slice(W - fed, W)
        own = [(layer.keys[b][:, cols], layer.values[b][:, cols]) for layer in self.layers]
        own_values = self.head_values[b, cols]
        if cache.match_length(tokens[:P]) == P:
            cache.insert(tokens, own, own_values, start=P)
            return
        s = self._start(smp.prompt)
        root = self.root_kv if s else [(k[g, :, :0], v[g, :, :0]) for k, v in zip(self.keys, self.values)]
        kv = [(torch.cat([rk, k[g, :, :P - s], ok], 1), torch.cat([rv, v[g, :, :P - s], ov], 1))
              for k, v, (ok, ov), (rk, rv) in zip(self.keys, self.values, own, root)]
        cache.insert(tokens, kv, torch.cat([self.prompts[g].values, own_values]))

    def _select(self, keep: list[int], room: int = 1) -> None:
        """Keep rows `keep` only, the own columns in use (a draft's holes squeezed out, right-aligned
        again) with at least `room` columns of room, and the prompts they continue."""
        dev = self.mask.device
        idx = torch.tensor(keep, device=dev)
        used = self.mask[idx, :self.width].bool()
        counts = used.sum(1)
        n = int(counts.max())
        # Row r's columns in use, in order, after n - count[r] left-padding slots (which repeat a
        # column, masked): a stable sort puts the unused columns first.
        order = torch.sort(used.to(torch.int8), dim=1, stable=True).indices[:, self.width - n:]
        pad = torch.arange(n, device=dev)[None] < (n - counts)[:, None]
        room = max(room, self.mask.shape[1] - n)  # the capacity it had: squeezed holes become room
        # No holes (no rejected draft among the kept rows): every row keeps the last n columns, one slice for all.
        W = self.width
        run = slice(W - n, W) if bool((order == torch.arange(W - n, W, device=dev)).all()) else order
        for layer in self.layers:
            layer.gather(idx, run, room)
        self.mask = _with_room((~pad).long(), room)
        self.head_values = _with_room(self.head_values[idx[:, None], order], room)
        self.pos, self.width = self.pos[idx], n
        self.samples = [self.samples[b] for b in keep]
        self.alive = [True] * len(keep)
        self.padded = bool(pad.any())
        used = {self.group_of[b] for b in keep}
        self.prompts = [p if g in used else None for g, p in enumerate(self.prompts)]  # freed, not copied
        self.group_of = [self.group_of[b] for b in keep]
        live = len(used)
        if len(self.prompts) > 8 and 4 * live < len(self.prompts):  # mostly free: a smaller slab
            self._regrow(live, self.prompt_len)
        self._share(dev)


def slab_slots(batch: "_Batch | None", live: int, length: int) -> int:
    """KV slots (slab slots x columns) a batch's prompts take once it holds `live` prompts of up to `length`
    tokens: its current slab if they fit, else the one it grows into (the scheduler's memory budget)."""
    if batch is not None and batch.fits(live, length):
        return len(batch.prompts) * batch.keys[0].shape[2]
    slots, columns = _slab_size(live, length)
    return slots * columns


def _slab_size(prompts: int, length: int) -> tuple[int, int]:
    """Slots and columns of a prompt slab for `prompts` prompts of up to `length` tokens: room for half as
    many prompts again (at least 2) and an eighth more columns, rounded to 32 (prompt_tiles' Lq), so
    that most admissions fit in place while the slab holds at most ~1.7x the prompts' KV."""
    return prompts + max(2, prompts // 2), -(-(length + length // 8) // 32) * 32


def _with_room(x: torch.Tensor, room: int) -> torch.Tensor:
    """x [rows, columns] followed by `room` zero columns."""
    return torch.cat([x, x.new_zeros(x.shape[0], room)], 1)
