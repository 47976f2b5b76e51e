"""The bench's baseline (a) replays the engine's search: same tree, or a loud divergence. No timing."""
from __future__ import annotations

import pytest

from alphamath.accounting import needed_tokens, scored_nodes
from alphamath.search_config import SearchConfig
from search_svc.engine import solve
from tests.bench import Diverged, HFReplay, Recorder, shape
from tests.fakes import ScriptedSandbox


@pytest.fixture(scope="module")
def recorded(tiny_model_dir):
    """A tiny-model MCTS search by the engine, with its calls recorded."""
    from alphamath.lm import LocalLM
    from alphamath.local import LocalPolicy, LocalValue

    lm = LocalLM(tiny_model_dir, dtype="fp32")
    rec = Recorder(LocalPolicy(lm), LocalValue(lm))
    cfg = SearchConfig(iterations=3, n_children=3, max_new_tokens=12, temperature=1.0)
    tree = solve("What is 2 + 3?", "mcts", rec, rec, ScriptedSandbox(), cfg)
    return lm, rec, cfg, tree


def test_baseline_a_builds_the_same_tree_and_computes_more(recorded):
    lm, rec, cfg, tree = recorded
    assert any(kind == "generate" for kind, *_ in rec.calls)
    hf = HFReplay(lm, rec.calls)
    again = solve("What is 2 + 3?", "mcts", hf, hf, ScriptedSandbox(), cfg)
    assert shape(again) == shape(tree)
    assert hf.i == len(rec.calls)
    states = [s for kind, texts, _, _ in rec.calls if kind == "score" for s in texts]
    needed = needed_tokens(tree, lm.encode, scored_nodes(tree, states))
    # n copies of every prompt prefilled: more than the search needed, and more than the engine.
    assert hf.computed > needed
    assert hf.computed > lm.usage.computed


def test_baseline_a_refuses_a_different_search(recorded):
    lm, rec, cfg, _ = recorded
    hf = HFReplay(lm, rec.calls)
    with pytest.raises(Diverged):
        solve("What is 7 + 1?", "mcts", hf, hf, ScriptedSandbox(), cfg)
    hf = HFReplay(lm, [])
    with pytest.raises(Diverged):
        hf.score(["anything"])


def test_grpc_bench_in_flight_is_littles_law_and_overhead_is_extra_time_per_problem():
    """bench_grpc's two derived figures on hand-built runs: 4 problems of 10 s each over a 20 s wall had
    2 in flight on average (one long problem finishing alone drags it toward 1); a stack at 30 problems/min
    against 40 in-process takes a third more time per problem."""
    from tests.bench_grpc import in_flight, overhead

    assert in_flight(4 * 10.0, 20.0) == 2.0
    assert in_flight(10.0 + 1 + 1 + 1, 10.0) == 1.3
    assert in_flight(5.0, 0.0) == 0.0
    assert overhead(40.0, 30.0) == pytest.approx(1 / 3)
    assert overhead(30.0, 30.0) == 0.0


def test_grpc_bench_counts_the_tokens_each_kept_step_generated():
    """bench_grpc's work measure: the token counts of a tree's steps (the root generated none), so two
    levels whose trees differ compare per unit of work."""
    from alphamath.steps import Step
    from alphamath.tree import Tree
    from tests.bench_grpc import generated_tokens

    tree = Tree(question="q", prompt="p")
    a = tree.add_child(0, Step(kind="text", text="a"), 0.5, token_count=12)
    tree.add_child(a.id, Step(kind="answer", text="b", answer="1"), 0.5, token_count=30)
    tree.add_child(0, Step(kind="text", text="c"), 0.5, token_count=7)
    assert generated_tokens(tree) == 49
    assert generated_tokens(Tree(question="q", prompt="p")) == 0


def test_the_stacks_tokens_come_from_the_tree_its_solve_response_carries():
    """The stack's levels count their work as the in-process ones do: from the tree the Solve
    response carries (include_tree), and a response without one is an error, not zero work."""
    import pytest

    from alphamath.steps import Step
    from alphamath.tree import Tree
    from search_svc.server import response_from_tree
    from tests.bench_grpc import response_tokens

    tree = Tree(question="q", prompt="p", question_id="q1")
    a = tree.add_child(0, Step(kind="text", text="a"), 0.5, token_count=12)
    tree.add_child(a.id, Step(kind="answer", text="b", answer="1"), 0.5, token_count=30)
    assert response_tokens(response_from_tree(tree, "sbs", True, 1.0)) == 42
    with pytest.raises(ValueError, match="include_tree"):
        response_tokens(response_from_tree(tree, "sbs", False, 1.0))


def test_bench_grpc_reports_the_median_run_whole():
    """Repeated levels report the run with the median problems/min, all of its figures from that run."""
    from tests.bench_grpc import median_run

    runs = [{"ppm": 90.0, "tok_s": 1.0}, {"ppm": 120.0, "tok_s": 2.0}, {"ppm": 100.0, "tok_s": 3.0}]
    assert median_run(runs) == {"ppm": 100.0, "tok_s": 3.0}
    assert median_run(runs[:2]) == {"ppm": 90.0, "tok_s": 1.0}  # an even count: the lower middle run
    assert median_run(runs[:1]) == runs[0]


def test_bench_grpc_splits_concurrency_1_into_contiguous_blocks_covering_every_problem_once():
    """One block of concurrency 1's problems before each run at 16: in order, every problem once, sizes
    as even as the count allows."""
    from tests.bench_grpc import c1_blocks

    assert c1_blocks(list(range(32)), 3) == [list(range(11)), list(range(11, 22)), list(range(22, 32))]
    assert c1_blocks(list(range(4)), 1) == [[0, 1, 2, 3]]
    assert c1_blocks(list(range(2)), 3) == [[0], [1]]  # fewer problems than runs: no empty block
