"""The bench's token ratio: computed / needed, with needed counted once per token position and sample."""
from __future__ import annotations

import pytest

from alphamath.accounting import merged_sample_tokens, needed_tokens, scored_nodes, token_counts, token_ratio, trie_size
from alphamath.interfaces import Sample
from alphamath.steps import STOP, Step, parse_step
from alphamath.tree import Tree


def chars(text: str) -> list[int]:
    """One token per character: positions can be counted by hand."""
    return [ord(c) for c in text]


def hand_tree() -> Tree:
    """root -> A "ab" (9 tokens sampled), B "ac" (9), and A -> D "d" (8); A is expanded."""
    tree = Tree(question="q", prompt="Q:")
    a = tree.add_child(0, Step("ab", "text"), 0.5, token_count=len("ab</step>"))
    tree.add_child(0, Step("ac", "text"), 0.5, token_count=len("ac</step>"))
    tree.add_child(a.id, Step("d", "answer", answer="d"), 0.5, token_count=len("d</step>"))
    return tree


def test_trie_size_counts_shared_prefixes_once():
    assert trie_size([[1, 2, 3], [1, 2, 4], [1, 2], [5]]) == 5
    assert trie_size([]) == 0


def test_needed_tokens_by_hand():
    """prompt 2; A fed "ab</step" 8; B fed "ac</step" 8 (its own sample: the "a" it shares with A
    counts again); A scored adds ">\\n" 2; A expanded adds "<step>" 6; D fed "d</step" 7. The root's
    state is the prompt: nothing new."""
    tree = hand_tree()
    assert needed_tokens(tree, chars, scored={0, 1}) == 2 + 8 + 8 + 2 + 6 + 7
    # A's state lies inside its generation prefix: scoring it reads nothing new.
    assert needed_tokens(tree, chars, scored={0}) == 2 + 8 + 8 + 2 + 6 + 7
    # B is an unscored leaf: its last sampled token (">") was never fed. Scoring B reads ">\\n".
    assert needed_tokens(tree, chars, scored={0, 2}) == 2 + 8 + 8 + 2 + 6 + 7 + 2


def test_distinct_positions_count_identical_sibling_prefixes_once():
    """Without owners, B's "a" is A's: 1 less than needed. Two samples with the same first tokens
    are two generations (needed), one position (distinct)."""
    tree = hand_tree()
    assert token_counts(tree, chars, scored={0, 1}).distinct == needed_tokens(tree, chars, scored={0, 1}) - 1
    twins = Tree(question="q", prompt="Q:")
    for text in ("xy1", "xy2"):
        twins.add_child(0, Step(text, "text"), 0.5, token_count=len(text + "</step>"))
    # prompt 2; each sample fed its text and "</step" (9 each); only the "xy" of the second is shared.
    assert needed_tokens(twins, chars, scored=set()) == 2 + 9 + 9
    assert token_counts(twins, chars, scored=set()).distinct == 2 + 9 + 7


def test_needed_never_exceeds_a_no_cache_engine_on_the_hand_tree():
    """A user re-encoding everything (n copies of the prompt per expansion, every state in full)
    computes more than needed: ratio >= 1 on the hand-built tree."""
    tree, scored = hand_tree(), {0, 1}
    computed = 0
    for node in tree.nodes:
        if node.children:
            kids = [tree.nodes[c] for c in node.children]
            computed += len(kids) * len(chars(tree.prefix(node.id))) + sum(k.token_count - 1 for k in kids)
        if node.id in scored:
            computed += len(chars(tree.state(node.id)))
    needed = needed_tokens(tree, chars, scored)
    assert token_ratio(computed, needed) > 1
    assert needed >= token_counts(tree, chars, scored).distinct


def test_merged_samples_count_their_generated_tokens():
    """Samples the tree merged (same stripped text for the same prompt, in one call or a later one)
    were generated all the same: each adds token_count - 1; distinct texts and other prompts add 0."""
    a, b = "<step>x = 1", "<step>x = 2"
    calls = [("P", [Sample(a, 4, -1.0, "stop"), Sample(b, 5, -1.0, "stop"), Sample(a + " ", 6, -2.0, "stop")]),
             ("P", [Sample(a, 3, -1.0, "stop"), Sample("<step>y", 2, -1.0, "stop")]),
             ("Q", [Sample(a, 4, -1.0, "stop")])]
    assert merged_sample_tokens(calls) == (6 - 1) + (3 - 1)
    tree = hand_tree()
    assert needed_tokens(tree, chars, {0}, calls) == needed_tokens(tree, chars, {0}) + 7


def test_token_ratio_refuses_nonsense():
    with pytest.raises(ValueError):
        token_ratio(10, 0)
    with pytest.raises(ValueError):
        token_ratio(-1, 5)
    assert token_ratio(6, 4) == 1.5


def test_scored_nodes_maps_states_to_ids():
    tree = hand_tree()
    assert scored_nodes(tree, [tree.state(1), tree.prompt, "unrelated"]) == {0, 1}


@pytest.mark.parametrize("seed", [1, 2])
def test_engine_ratio_at_least_one_on_a_tree_it_built(tiny_model_dir, seed):
    """The prefix-cached engine expands and scores a hand-driven tree; what it computed is at least
    what the search needed, and the needed count is more than the prompt (it counts the samples)."""
    from alphamath.lm import LocalLM
    from alphamath.steps import render_prompt

    lm = LocalLM(tiny_model_dir, dtype="fp32")
    tree = Tree(question="2+3?", prompt=render_prompt("What is 2 + 3?", lm.tokenizer))
    scored: set[int] = set()

    generations = []

    def expand(node_id: int, n: int) -> list[int]:
        samples = lm.generate([tree.prefix(node_id)], n, stop=list(STOP), temperature=1.0, max_new_tokens=8, seed=seed)[0]
        generations.append((tree.prefix(node_id), samples))
        return [tree.add_child(node_id, parse_step(s), 0.5, s.token_count).id for s in samples]

    def score(ids: list[int]) -> None:
        lm.score([tree.state(i) for i in ids])
        scored.update(ids)

    score([0])
    kids = expand(0, 3)
    score(kids[:2])
    grandkids = expand(kids[0], 2)
    score(grandkids[:1])
    needed = needed_tokens(tree, lm.encode, scored, generations)
    generated = sum(n.token_count - 1 for n in tree.nodes[1:])
    assert needed > len(lm.encode(tree.prompt)) + generated // 2
    assert token_ratio(lm.usage.computed, needed) >= 1
