"""Token accounting of one search: tokens the model computed against tokens the search needed.

`make bench` reports computed / needed. The denominator counts, as a token trie (a position is a
token id after a given prefix), the positions the search made the model read:

  - the prompt, once;
  - every generated token, per sample: a sample of g tokens costs g forwards, at the position of
    the prefix's last token (already counted) and at its own first g - 1 tokens (the last one is read
    only if a state containing it is, which the next items count). Samples the tree merged into an
    existing child (the same step text) were generated all the same, because the search asked for n
    samples: their g - 1 each are added outside the trie (`merged_sample_tokens`);
  - every scored state: its tokens beyond its parent's state (what the value head reads);
  - every expanded node's generation prefix (what the policy is given).

A position belongs to the node whose step wrote it (the prompt's to the root), so the prefixes the
search shares (the prompt, a parent's state below its children) count once, and each sample counts
its own tokens even where two siblings happen to start alike: n independent samples are n
generations. An engine that computes every position it uses at least once therefore computes at
least this many tokens: computed / needed >= 1 for any engine, and 1 for a perfect one. Wasted work
(recomputed prefixes, idle batch rows, the same prompt prefilled for every sample) raises the ratio.

`token_counts(...).distinct` is the stricter count without owners: siblings' identical first tokens count
once, which only an engine that decodes identical sample prefixes once could reach (ours does not).

Trees store step texts, not sampled token ids, so a sample's tokens are recovered by encoding its
state; this is exact when the tokenizer round-trips what the model sampled.
"""
from __future__ import annotations

from typing import Callable, Collection, Iterable, NamedTuple, Sequence

from alphamath.interfaces import Sample
from alphamath.tree import Tree

Encode = Callable[[str], Sequence[int]]


def trie_size(sequences: Iterable[Sequence[int]]) -> int:
    """Distinct positions over token sequences: a position is a prefix, so shared prefixes count once."""
    root: dict = {}
    count = 0
    for seq in sequences:
        node = root
        for tok in seq:
            nxt = node.get(tok)
            if nxt is None:
                nxt = node[tok] = {}
                count += 1
            node = nxt
    return count


def needed_sequences(tree: Tree, encode: Encode, scored: Collection[int]) -> list[list[tuple[int, int]]]:
    """The token sequences the search made the model read (see the module doc), as (owner, token id)
    pairs, the owner being the node whose step wrote the position: the prompt; for every node, its
    parent's prefix followed by its first token_count - 1 tokens; the state of every node in `scored`
    (node ids the value head read); the generation prefix of every expanded node."""
    prefix_len: dict[int, int] = {}

    def start(node_id: int) -> int:
        """First position the node's step wrote: the length of its parent's generation prefix."""
        parent = tree.nodes[node_id].parent
        if parent not in prefix_len:
            prefix_len[parent] = len(encode(tree.prefix(parent)))
        return prefix_len[parent]

    def owned(tokens: Sequence[int], node_id: int) -> list[tuple[int, int]]:
        """Each position tagged with the deepest node on the path to node_id that wrote it."""
        owners = [0] * len(tokens)
        for node in tree.path(node_id):
            s = start(node.id)
            owners[s:] = [node.id] * max(len(tokens) - s, 0)
        return list(zip(owners, tokens))

    out = [owned(encode(tree.prompt), 0)]
    for node in tree.nodes:
        if node.children:
            toks = encode(tree.prefix(node.id))
            prefix_len[node.id] = len(toks)
            out.append(owned(toks, node.id))
        if node.id in scored or node.parent is not None:
            state = owned(encode(tree.state(node.id)), node.id)  # encoded once for both uses
            if node.id in scored:
                out.append(state)
            if node.parent is not None:
                out.append(state[: start(node.id) + max(node.token_count - 1, 0)])
    return out


def merged_sample_tokens(generations: Iterable[tuple[str, Sequence[Sample]]]) -> int:
    """Generated tokens of the samples a tree does not hold: for (prompt, samples) pairs of every
    policy call, each sample whose step text (stripped, as expansion compares them) an earlier sample
    of the same prompt already had costs its token_count - 1 fed tokens, like any sample."""
    seen: set[tuple[str, str]] = set()
    extra = 0
    for prompt, samples in generations:
        for s in samples:
            key = (prompt, s.text.strip())
            if key in seen:
                extra += max(s.token_count - 1, 0)
            seen.add(key)
    return extra


class TokenCounts(NamedTuple):
    needed: int    # positions with their owners: every sample counts its own tokens
    distinct: int  # the stricter count without owners: identical sibling prefixes once


def token_counts(tree: Tree, encode: Encode, scored: Collection[int],
                 generations: Iterable[tuple[str, Sequence[Sample]]] = ()) -> TokenCounts:
    """Both counts from one pass over the tree: the tries of `needed_sequences` with and without owners,
    each plus the generated tokens of merged samples when the policy calls (`generations`) are given."""
    seqs = needed_sequences(tree, encode, scored)
    merged = merged_sample_tokens(generations)
    return TokenCounts(trie_size(seqs) + merged, trie_size([tok for _, tok in seq] for seq in seqs) + merged)


def needed_tokens(tree: Tree, encode: Encode, scored: Collection[int],
                  generations: Iterable[tuple[str, Sequence[Sample]]] = ()) -> int:
    """Tokens the search needed (`token_counts(...).needed`)."""
    return token_counts(tree, encode, scored, generations).needed


def token_ratio(computed: int, needed: int) -> float:
    """computed / needed; >= 1 for an engine that computes each needed position at least once."""
    if needed <= 0:
        raise ValueError(f"needed tokens must be positive, got {needed}")
    if computed < 0:
        raise ValueError(f"computed tokens must be >= 0, got {computed}")
    return computed / needed


def scored_nodes(tree: Tree, states: Iterable[str]) -> set[int]:
    """Ids of the nodes whose state is among `states` (the texts a value model was asked to score)."""
    wanted = set(states)
    return {n.id for n in tree.nodes if tree.state(n.id) in wanted}
