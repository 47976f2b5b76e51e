"""Draft tokens by prompt lookup: the tokens that followed the last earlier occurrence of the text's
last n-gram (n = 3, else 2, else 1).

Why: a decode step of a few rows costs the same as a step of up to ~16 (it reads every weight once
either way), and a search's steps are mostly such few-row steps: the tail of each expansion, where
the longest of its samples decodes alone. A solution step repeats much of what came before it (the
question's numbers, the previous steps' variables, code, the few-shot format), so the tokens that
followed the same n-gram earlier are often the ones sampled next. On the bench's MCTS samples
(`make bench`'s problems) drafts of 3 tokens were accepted at ~1 token per step: 2.0 tokens per
sequential step instead of 1. Verification keeps the samples exact (kv.py's _Batch.step), so a
draft only ever costs compute, never changes what is sampled. That compute counts against the token
ratio (computed / needed tokens), so a draft is as long as its match is trustworthy (draft_cut), and a
step feeds each row only its own draft (ragged: no row is padded to the longest).
"""
from __future__ import annotations

N_MAX = 3  # longest n-gram looked up
DRAFT_MAX = 4  # draft tokens per row and step at most (more gained little on the bench's samples)
REACH_CAP = 16  # a match reaching this far back drafts DRAFT_MAX tokens
# Tokens accepted per draft position before a batch has measured its own. Cut drafts (draft_cut) are accepted
# 64-77% of the time (s39: MCTS and SBS on an AMX Xeon), but a prior of 0.7 measured no faster there than 0.35.
YIELD_PRIOR = 0.35


def draft_length(drafts: list[int], yield_: float, row_cost: float, max_rows: int) -> int:
    """Draft tokens per row at most, for a step whose live rows have drafts of these lengths (what the lookup
    offers them, cut by draft_cut): the k <= DRAFT_MAX (and feeding at most max_rows query rows) that
    maximises the tokens a step yields per unit of its cost,

        (rows + yield_ * drafted) / (1 + row_cost * (rows + drafted - 1)),   drafted = sum(min(d, k)),

    where yield_ is the tokens accepted per draft position so far and row_cost a query row's cost
    relative to a one-row step (FastLlama.row_cost). A verifying step is ragged (kv.py), so a row without a
    draft adds no query row. Few rows: drafts are nearly free; many rows, or text that does not repeat
    itself (a low yield): none."""
    rows = len(drafts)

    def gain(k: int) -> float:
        drafted = sum(min(d, k) for d in drafts)
        return (rows + yield_ * drafted) / (1 + row_cost * (rows + drafted - 1))

    fits = [k for k in range(1, DRAFT_MAX + 1) if rows + sum(min(d, k) for d in drafts) <= max_rows]
    return max([0] + fits, key=gain)


def reach(tokens: list[int], end: int, at: int, cap: int = REACH_CAP) -> int:
    """How many tokens before `end` equal those before `at` (the match behind a draft from `at`), up to cap."""
    m = 0
    while m < cap and at - m - 1 >= 0 and tokens[at - m - 1] == tokens[end - m - 1]:
        m += 1
    return m


def draft_cut(m: int) -> int:
    """Draft tokens worth feeding after a match reaching m tokens back: none below 4 (a 1-3-gram match is a
    guess: its first token was accepted 45-70% of the time), 1 from 4, 2 from 8, DRAFT_MAX from 16 (a copy in
    progress: the question's numbers, a variable's name, the format). Replayed (tests/draft_replay.py) and run
    in the engine on the bench's MCTS (s39, AMX Xeon): ~76% of drafted tokens accepted where drafting 4 at any
    match accepted ~40%, so the token ratio's rejected positions fell ~6x for about the same wall."""
    return 0 if m < 4 else 1 if m < 8 else 2 if m < REACH_CAP else DRAFT_MAX


class Lookup:
    """An index of a token sequence's n-grams (n <= N_MAX) to where each last occurred, grown as tokens
    are appended. An n-gram is indexed once the token after it exists, so the sequence's own last
    n-gram finds its previous occurrence, not itself."""

    def __init__(self, tokens: list[int], index: dict | None = None, indexed: int = 0):
        self.tokens = tokens
        self.index: dict[tuple, int] = index if index is not None else {}  # n-gram -> position after it
        self.indexed = indexed  # positions [0, indexed) have their n-grams ending before them indexed
        self.extend_to(len(tokens))

    def extend_to(self, length: int) -> None:
        """Index the n-grams ending before positions up to `length - 1` (each one's next token exists)."""
        t, index = self.tokens, self.index
        for e in range(max(self.indexed, 1), length):  # the n-grams ending at e - 1, followed by t[e]
            for n in range(1, min(N_MAX, e) + 1):
                index[tuple(t[e - n:e])] = e
        self.indexed = max(self.indexed, length)

    def fork(self, tokens: list[int]) -> "Lookup":
        """A Lookup of `tokens`, which start with this one's tokens: the index is copied, not rebuilt."""
        return Lookup(tokens, dict(self.index), self.indexed)

    def draft(self, k: int, cut=draft_cut) -> list[int]:
        """Up to k tokens that followed the last earlier occurrence of the sequence's longest matching
        final n-gram, at most cut(the match's reach) of them (None: no cut); [] if none occurred."""
        t = self.tokens
        self.extend_to(len(t))
        for n in range(min(N_MAX, len(t)), 0, -1):
            e = self.index.get(tuple(t[len(t) - n:]))
            if e is not None:
                return t[e:e + (k if cut is None else min(k, cut(reach(t, len(t), e))))]
        return []
