"""The radix prefix cache: KV states (and value-head outputs) of token sequences, prefixes stored once.

It exists because MCTS asks for the same text over and over (one few-shot prompt per question,
siblings sharing their parent state): LocalLM keeps the KV of every token it computes here, keyed by
token ids, and computes only what follows the longest cached prefix (as sglang's
mem_cache/radix_cache.py does for its server).
"""
from __future__ import annotations

from typing import Sequence

import torch

KV = list  # per layer: (keys [heads, tokens, head_dim], values [heads, tokens, head_dim])
DEFAULT_MAX_CACHED_TOKENS = 32768  # ~0.75 GB of bf16 KV for SmolLM2-135M (30 layers x 3 kv heads x 64)


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

    def branch_length(self, tokens: Sequence[int]) -> int:
        """Tokens of `tokens` up to where the cached sequences that start as it does first branch (the
        radix tree's first edge on its path: the prefix all of them share), if `tokens` holds that edge
        whole; else 0. A decode batch holds this prefix once (kv.py's _Batch root)."""
        child = self.root.children.get(tokens[0]) if len(tokens) else None
        if child is None or list(tokens[:len(child.tokens)]) != child.tokens:
            return 0
        return len(child.tokens)

    def match(self, tokens: Sequence[int]) -> tuple[int, KV | None, torch.Tensor | None]:
        """(m, KV of tokens[:m], value-head outputs of tokens[:m]) for the longest cached prefix."""
        m, parts, values = self.match_parts(tokens)
        if parts is None:
            return 0, None, None
        kv = [(torch.cat([k for k, _ in layer], dim=1), torch.cat([v for _, v in layer], dim=1)) for layer in parts]
        return m, kv, values

    def match_parts(self, tokens: Sequence[int]) -> tuple[int, list | None, torch.Tensor | None]:
        """`match`, with each layer's KV as the path's edges in order, views of the cache: [[(keys, values)
        of an edge's matched tokens, ...] per layer]. A prefill copies them once, into its own buffer;
        joining them first had copied every cached past twice."""
        path = list(self._walk(tokens))
        if not path:
            return 0, None, None
        self._touch(path[-1][0])
        m = sum(n for _, n in path)
        parts = [[(node.kv[l][0][:, :n], node.kv[l][1][:, :n]) for node, n in path] for l in range(len(path[0][0].kv))]
        values = torch.cat([node.values[:n] for node, n in path])
        return m, parts, values

    def insert(self, tokens: Sequence[int], kv: KV, values: torch.Tensor, start: int = 0) -> None:
        """Store the KV of `tokens`: kv and values cover tokens[start:], and tokens[:start] must be cached
        already (a decode row passes only what it computed past its cached prompt). Only the uncached
        suffix is kept."""
        tokens = list(tokens)
        node, i = self.root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                if i < start:
                    raise ValueError(f"insert(start={start}): only {i} of those tokens are cached")
                leaf = _Node(tokens[i:], _slice_kv(kv, i - start, copy=True), values[i - start:].clone(), node)
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
