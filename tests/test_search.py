"""Search arithmetic pinned on hand-built trees with a scripted policy, value and sandbox."""
import random

import pytest

from alphamath.steps import Step
from alphamath.tree import Tree
from alphamath.search_config import SearchConfig
from search_svc.engine import solve
from search_svc.expand import evaluate, expand, prior
from search_svc.mcts import backup, best_answer_node, mcts, puct, select_child, select_leaf
from tests.fakes import ConstValue, ScriptedPolicy, ScriptedSandbox, exact, sample

A = sample("A</step>", prior=0.8)
WRONG = sample("So \\boxed{5}</step>", prior=0.4)
RIGHT = sample("Hence \\boxed{7}</step>", prior=0.9)
BROKEN = sample("I am not sure", prior=0.5, finish="eos")


def tree_with(children_priors, question="q"):
    t = Tree(question=question, prompt="P<step>")
    for i, p in enumerate(children_priors):
        t.add_child(0, Step(f"s{i}", "text"), p)
    return t


def test_puct_formula():
    t = tree_with([0.5, 0.25])
    root, a, b = t.nodes
    root.N, a.N, a.W, b.N, b.W = 9, 3, 1.5, 0, 0.0
    c = 2.0
    assert puct(root, a, c) == pytest.approx(0.5 + c * 0.5 * 3 / 4)
    assert puct(root, b, c) == pytest.approx(0.0 + c * 0.25 * 3 / 1)


def test_q_is_zero_when_unvisited_and_backup_adds_to_all_ancestors():
    t = tree_with([0.5])
    grandchild = t.add_child(1, Step("g", "text"), 0.3)
    assert grandchild.Q == 0.0
    backup(t, grandchild.id, 0.6)
    backup(t, 1, -0.2)
    assert [(n.N, round(n.W, 6)) for n in t.nodes] == [(2, 0.4), (2, 0.4), (1, 0.6)]
    assert t.nodes[1].Q == pytest.approx(0.2)


def test_selection_skips_terminals_and_breaks_ties_with_seeded_rng():
    t = tree_with([0.5, 0.5, 0.5, 0.9])
    t.nodes[4].terminal_reason = "malformed"  # highest prior, but terminal
    picks = {select_child(t, t.root, 1.0, random.Random(s)).id for s in range(30)}
    assert picks == {1, 2, 3}
    same = [select_child(t, t.root, 1.0, random.Random(7)).id for _ in range(5)]
    assert len(set(same)) == 1


def test_node_with_all_children_terminal_becomes_terminal():
    t = tree_with([0.9, 0.5])
    t.root.N = 1  # prior term sqrt(N_parent) > 0, so child 1 wins the first selection
    t.add_child(1, Step("x", "malformed"), 0.5).terminal_reason = "malformed"
    leaf = select_leaf(t, 1.0, random.Random(0))
    assert leaf.id == 2 and t.nodes[1].terminal_reason == "children_terminal"
    t.nodes[2].terminal_reason = "answer"
    assert select_leaf(t, 1.0, random.Random(0)) is None
    assert t.root.terminal_reason == "children_terminal"


def test_expansion_dedupes_keeps_malformed_and_sets_priors():
    policy = ScriptedPolicy({(): [A, A, BROKEN, WRONG, A]})
    t = Tree(question="q", prompt="P<step>", ground_truth="7")
    kids = expand(t, [0], 5, policy, ScriptedSandbox(), SearchConfig())[0]
    assert [k.text for k in kids] == ["A", "I am not sure", "So \\boxed{5}"]
    assert [k.terminal_reason for k in kids] == [None, "malformed", "answer"]
    assert kids[0].prior == pytest.approx(0.8) and prior(A) == pytest.approx(0.8)
    assert [k.share for k in kids] == [0.6, 0.2, 0.2]  # A was drawn 3 times of 5
    values = evaluate(t, kids[1:], ConstValue(0.3), exact)
    assert values == [-1.0, -1.0] and kids[2].correct is False


def test_code_steps_run_in_sandbox_with_earlier_cells_and_errors_count():
    code = sample("Compute.\n<code>\nprint(12)\n</code>", prior=0.7)
    bad = sample("Try.\n<code>\nraise\n</code>", prior=0.7)
    policy = ScriptedPolicy({(): [code], ("Compute.\n",): [bad]}, default=[bad])
    box = ScriptedSandbox()
    cfg = SearchConfig(max_code_errors=2, max_depth=8)
    t = Tree(question="q", prompt="P<step>")
    c1 = expand(t, [0], 1, policy, box, cfg)[0][0]
    assert c1.kind == "code" and c1.output.strip() == "12" and not c1.code_error
    assert "<output>\n12\n</output>" in t.state(c1.id)
    node = c1
    reasons = []
    for _ in range(3):
        node = expand(t, [node.id], 1, policy, box, cfg)[0][0]
        reasons.append((node.code_error, node.terminal_reason))
    assert reasons == [(True, None), (True, None), (True, "code_errors")]
    assert box.calls[1] == ["print(12)", "raise"]
    assert "ValueError: boom" in node.output



def test_the_code_of_every_node_expanded_in_one_call_runs_in_one_set_of_sandboxes():
    import threading

    class Gathered(ScriptedSandbox):
        """Each execution waits until 4 are running: leaf-by-leaf execution (2 each) cannot get there."""
        def __init__(self):
            super().__init__()
            self.barrier = threading.Barrier(4, timeout=30)

        def execute(self, cells):
            self.barrier.wait()
            return super().execute(cells)

    def code(x):
        return sample(f"Compute {x}.\n<code>\nprint({x})\n</code>")
    policy = ScriptedPolicy({(): [code(1), code(2)], ("Compute 1.\n",): [code(3), code(4)],
                             ("Compute 2.\n",): [code(5), code(6)]})
    t = Tree(question="q", prompt="P<step>")
    a, b = expand(t, [0], 2, policy, ScriptedSandbox(), SearchConfig())[0]
    box = Gathered()
    kids = expand(t, [a.id, b.id], 2, policy, box, SearchConfig())
    assert [[k.output.strip() for k in group] for group in kids] == [["3", "4"], ["5", "6"]]
    assert sorted(c[-1] for c in box.calls) == [f"print({x})" for x in (3, 4, 5, 6)]
    assert all(c[0] == ("print(1)" if c[-1] in ("print(3)", "print(4)") else "print(2)") for c in box.calls)

def test_max_depth_is_a_failed_terminal():
    policy = ScriptedPolicy({}, default=[A])
    t = Tree(question="q", prompt="P<step>", ground_truth="7")
    cfg = SearchConfig(max_depth=2)
    a = expand(t, [0], 1, policy, ScriptedSandbox(), cfg)[0][0]
    b = expand(t, [a.id], 1, policy, ScriptedSandbox(), cfg)[0][0]
    assert (a.terminal_reason, b.terminal_reason) == (None, "max_depth")
    assert evaluate(t, [b], ConstValue(0.9), exact) == [-1.0]


def test_mcts_statistics_by_hand():
    """Root -> {A, wrong}; A -> {right, broken}. Value head says 0.5 everywhere."""
    policy = ScriptedPolicy({(): [A, WRONG], ("A",): [RIGHT, BROKEN]})
    t = Tree(question="q", prompt="P<step>", ground_truth="7")
    cfg = SearchConfig(iterations=10, n_children=2)
    mcts(t, policy, ConstValue(0.5), ScriptedSandbox(), cfg, exact)
    root, a, wrong, right, broken = t.nodes
    # it1: wrong backs up -1, root's own value +0.5; it2: right +1, broken -1, A's value +0.5;
    # it3: A's children are all terminal, then so are root's: the search stops.
    assert t.meta["iterations_done"] == 2
    assert (root.N, root.W) == (5, pytest.approx(0.0))
    assert (a.N, a.W) == (3, pytest.approx(0.5))
    assert (wrong.N, wrong.W, right.N, right.W, broken.N, broken.W) == (1, -1, 1, 1, 1, -1)
    assert a.terminal_reason == "children_terminal" and root.terminal_reason == "children_terminal"
    assert t.meta["answer"] == "7" and t.meta["correct"] is True
    assert right.correct is True and wrong.correct is False


def test_answer_selection_by_q_value_or_visits():
    t = tree_with([0.5, 0.5])
    x = t.add_child(1, Step("x", "answer", answer="1"), 0.5)
    y = t.add_child(2, Step("y", "answer", answer="2"), 0.5)
    for n in (x, y):
        n.terminal_reason = "answer"
    t.nodes[1].N, t.nodes[1].W, t.nodes[1].value = 4, 2.0, -0.5  # Q 0.5, many visits, low value
    t.nodes[2].N, t.nodes[2].W, t.nodes[2].value = 1, 0.9, 0.8   # Q 0.9, few visits, high value
    for n, v in ((x, 0.1), (y, 0.2)):
        n.N, n.W, n.value = 1, v, v
    assert best_answer_node(t, "q").answer == "2"
    assert best_answer_node(t, "value").answer == "2"
    assert best_answer_node(t, "visits").answer == "1"


def test_sbs_keeps_top_b1_and_final_answers_shrink_the_beam():
    s = {n: sample(f"{n}</step>") for n in ("a", "b", "c", "d")}
    ans = {n: sample(f"{n} \\boxed{{{n}}}</step>") for n in ("x", "y", "z")}
    policy = ScriptedPolicy({
        (): [s["a"], s["b"], s["c"], s["d"]],
        ("a",): [ans["x"], BROKEN], ("b",): [ans["y"], s["d"]], ("b", "d"): [ans["z"]],
    })
    value = ConstValue(0.0, by_text={"a<": 0.9, "b<": 0.8, "c<": 0.1, "d<": 0.2,
                                     "x \\": 0.7, "y \\": 0.3, "z \\": 0.95})
    cfg = SearchConfig(beam_b1=2, beam_b2=2, max_depth=8)
    t = solve("q", "sbs", policy, value, ScriptedSandbox(), cfg, ground_truth="z", check=exact)
    first = policy.calls[0]
    assert first[1] == 4  # B1 * B2 children at the root
    # depth 1 keeps a (.9), b (.8); depth 2 candidates x .7, y .3, d .2 (broken is failed):
    # top 2 = x, y, both answers -> both final -> the beam is empty; z is never reached.
    assert sorted(n.answer for n in t.nodes if n.terminal_reason == "answer") == ["x", "y"]
    assert t.meta["answer"] == "x" and t.meta["correct"] is False
    assert all(c[1] == 2 for c in policy.calls[1:])


def test_sbs_with_no_kept_answer_still_answers_from_the_answers_it_generated():
    # The head rates open states above answers: the beam keeps "a" paths until the depth limit.
    policy = ScriptedPolicy({(): [sample("a</step>"), sample("x \\boxed{x}</step>")],
                             ("a",): [sample("a</step>"), sample("y \\boxed{y}</step>")],
                             ("a", "a"): [sample("a</step>"), sample("b</step>")]})
    value = ConstValue(0.0, by_text={"a<": 0.5, "x \\": -0.9, "y \\": -0.2})
    cfg = SearchConfig(beam_b1=1, beam_b2=2, max_depth=3)
    t = solve("q", "sbs", policy, value, ScriptedSandbox(), cfg, ground_truth="y", check=exact)
    assert sorted(n.answer for n in t.nodes if n.terminal_reason == "answer") == ["x", "y"]
    assert {n.terminal_reason for n in t.nodes if n.depth == 3} == {"max_depth"}  # the beam ran out of depth
    assert t.meta["kept_answers"] == 0  # the beam kept none: the vote runs over what was generated
    assert t.meta["answer"] == "y" and t.meta["correct"] is True  # y: (1 - 0.2) / 2 > x: (1 - 0.9) / 2
    # With no answer generated at all, there is still none to give.
    policy = ScriptedPolicy({(): [sample("a</step>")], ("a",): [sample("a</step>")], ("a", "a"): [sample("a</step>")]})
    t = solve("q", "sbs", policy, value, ScriptedSandbox(), cfg, ground_truth="y", check=exact)
    assert t.meta.get("answer") is None and t.meta["kept_answers"] == 0


def test_sbs_answers_by_a_value_weighted_vote_over_every_answer_it_generated():
    # Root: three samples answer "5", one "4"; every answer is final at depth 1 (B1 = 4).
    root = [sample("five \\boxed{5}</step>"), sample("again \\boxed{5}</step>"),
            sample("still \\boxed{5}</step>"), sample("four \\boxed{4}</step>")]
    cfg = SearchConfig(beam_b1=4, beam_b2=1, max_depth=8)
    # A constant head: a majority vote (5 wins 3 x 0.5 against 0.5), whatever the ground truth.
    t = solve("q", "sbs", ScriptedPolicy({(): root}), ConstValue(0.0), ScriptedSandbox(), cfg,
              ground_truth="4", check=exact)
    assert t.meta["answer"] == "5" and t.meta["correct"] is False
    # A head sure of "4" and of nothing else outweighs the three: 0.95 against 3 x 0.05.
    value = ConstValue(-0.9, by_text={"four": 0.9})
    t = solve("q", "sbs", ScriptedPolicy({(): root}), value, ScriptedSandbox(), cfg, ground_truth="4", check=exact)
    assert t.meta["answer"] == "4" and t.meta["correct"] is True


def test_sbs_counts_every_sample_of_a_merged_step_in_its_vote():
    """Identical samples are one node; the vote weighs an answer by the share of the samples that wrote
    its path, so a step the policy drew 3 times in 5 outweighs two answers drawn once each."""
    root = [sample("four \\boxed{4}</step>"), sample("five \\boxed{5}</step>"), sample("four \\boxed{4}</step>"),
            sample("again \\boxed{5}</step>"), sample("four \\boxed{4}</step>")]
    cfg = SearchConfig(beam_b1=5, beam_b2=1, max_depth=8)
    t = solve("q", "sbs", ScriptedPolicy({(): root}), ConstValue(0.0), ScriptedSandbox(), cfg,
              ground_truth="4", check=exact)
    answers = [n for n in t.nodes if n.terminal_reason == "answer"]
    assert [(n.answer, n.share) for n in answers] == [("4", 0.6), ("5", 0.2), ("5", 0.2)]
    assert t.meta["answer"] == "4" and t.meta["correct"] is True  # 0.6 x 0.5 against 2 x 0.2 x 0.5
    assert t.nodes[t.meta["distinct_vote_node"]].answer == "5"  # one vote per node: 2 against 1
    # Deeper, the shares multiply along the path: "7" is 3/4 x 1/2 of the samples, "8" 1/4.
    policy = ScriptedPolicy({(): [sample("a</step>"), sample("a</step>"), sample("a</step>"),
                                  sample("b \\boxed{8}</step>")],
                             ("a",): [sample("x \\boxed{7}</step>"), sample("y \\boxed{9}</step>")]})
    value = ConstValue(0.0, by_text={"a<": 0.9})
    t = solve("q", "sbs", policy, value, ScriptedSandbox(), SearchConfig(beam_b1=2, beam_b2=2, max_depth=8))
    shares = {n.answer: n.share for n in t.nodes if n.terminal_reason == "answer"}
    assert shares == {"8": 0.25, "7": 0.5, "9": 0.5}
    assert t.meta["answer"] == "7"  # 0.375 (ties with "9", seen later) against 0.25 for "8"
    assert t.nodes[t.meta["distinct_vote_node"]].answer == "8"  # one node each: the first seen


def test_greedy_and_majority():
    policy = ScriptedPolicy({(): [RIGHT, RIGHT, WRONG, RIGHT, BROKEN]})
    t = solve("q", "greedy", policy, ConstValue(0.2), ScriptedSandbox(), SearchConfig(),
              ground_truth="7", check=exact)
    assert t.meta["answer"] == "7" and policy.calls[0][2] == 0.0 and t.meta["value"] == 0.2
    t = solve("q", "majority", policy, ConstValue(0.2), ScriptedSandbox(),
              SearchConfig(majority_k=5), ground_truth="7", check=exact)
    assert t.meta["votes"] == {"7": 3, "5": 1} and t.meta["answer"] == "7"


def test_ground_truth_reaches_the_search_only_as_rewards_for_data_generation():
    """Evaluation grades the chosen answer; only `rewards` lets terminals back up +1/-1, else an
    MCTS accuracy would measure the search's access to the answer, not the model."""
    value = ConstValue(0.0, by_text={"boxed{5}": 0.9, "boxed{7}": 0.1})  # the head prefers the wrong answer
    runs = {}
    for rewards in (False, True):
        policy = ScriptedPolicy({(): [WRONG, RIGHT]})
        runs[rewards] = solve("q", "mcts", policy, value, ScriptedSandbox(), SearchConfig(n_children=2, iterations=4),
                              ground_truth="7", check=exact, rewards=rewards)
    graded, generated = runs[False], runs[True]
    assert [n.value for n in graded.nodes[1:]] == [0.9, 0.1]
    assert (graded.meta["answer"], graded.meta["correct"], graded.meta["rewards"]) == ("5", False, False)
    assert [n.value for n in generated.nodes[1:]] == [-1.0, 1.0]
    assert (generated.meta["answer"], generated.meta["correct"], generated.meta["rewards"]) == ("7", True, True)


def test_tree_json_round_trip_is_identical():
    policy = ScriptedPolicy({(): [A, WRONG], ("A",): [RIGHT, BROKEN]})
    t = solve("q", "mcts", policy, ConstValue(0.5), ScriptedSandbox(), SearchConfig(n_children=2),
              ground_truth="7", check=exact, rewards=True)
    again = Tree.from_json(t.to_json())
    assert again.to_json() == t.to_json()
    assert [n.Q for n in again.nodes] == [n.Q for n in t.nodes]


@pytest.mark.parametrize("question,method,msg", [
    ("", "mcts", "empty"), ("x" * 5000, "mcts", "limit"), ("q", "bogus", "unknown method")])
def test_bad_input(question, method, msg):
    with pytest.raises(ValueError, match=msg):
        solve(question, method, ScriptedPolicy({}), ConstValue(), ScriptedSandbox(), check=exact)
    with pytest.raises(ValueError, match="iterations"):
        SearchConfig(iterations=0).validate()


class SeededPolicy(ScriptedPolicy):
    """Like ScriptedPolicy, but each call at a path serves the next batch of its script: fresh
    samples at an exhausted node can differ from the first ones, as real sampling does."""

    def generate(self, prompts, n, *, stop, temperature, top_p=1.0, max_new_tokens=256, seed=None):
        out = []
        for p in prompts:
            steps = tuple(s.split("</step>")[0].split("<code>")[0] for s in p.split("<step>")[1:-1])
            self.calls.append((steps, n, temperature))
            batches = self.script[steps]
            out.append(batches.pop(0) if len(batches) > 1 else batches[0])
        return out


def test_exhausted_data_generation_tree_keeps_looking_until_a_correct_path():
    """Root -> {wrong, broken} exhausts the tree at once; the budget then buys fresh samples at the
    root (duplicates of existing children dropped) until the correct answer appears."""
    policy = SeededPolicy({(): [[WRONG, BROKEN], [WRONG, BROKEN], [WRONG, RIGHT]]})
    t = solve("q", "mcts", policy, ConstValue(0.0), ScriptedSandbox(), SearchConfig(n_children=2, iterations=10),
              ground_truth="7", check=exact, rewards=True)
    assert len(policy.calls) == 3 and t.meta["resampled"] == 2
    assert [n.text for n in t.nodes[1:]] == ["So \\boxed{5}", "I am not sure", "Hence \\boxed{7}"]
    assert t.meta["correct"] is True and t.nodes[3].correct is True and t.nodes[3].N == 1
    # the root's visits: its own value once per expansion (3) plus each terminal's backup (3)
    assert t.root.N == 6 and t.root.W == pytest.approx(-1 - 1 + 1)
    assert t.meta["iterations_done"] == 3  # stopped once a correct path exists and the tree is exhausted
    assert t.meta["first_correct_iteration"] == 3


def test_batched_resampling_draws_k_times_n_in_one_call_and_counts_k_simulations():
    """With 4 leaves per call an exhausted tree's fresh samples come as one call of 4 * n at the node,
    the node's value backed up 4 times: 4 simulations of the budget, as 4 resamples in a row."""
    policy = SeededPolicy({(): [[WRONG, BROKEN], [WRONG, BROKEN, RIGHT]]})
    t = solve("q", "mcts", policy, ConstValue(0.0), ScriptedSandbox(),
              SearchConfig(n_children=2, iterations=10, leaves_per_call=4), ground_truth="7", check=exact,
              rewards=True)
    assert [c[1] for c in policy.calls] == [2, 8]  # the root's expansion (the only leaf), then 4 * n
    assert [n.text for n in t.nodes[1:]] == ["So \\boxed{5}", "I am not sure", "Hence \\boxed{7}"]
    assert t.meta["resampled"] == 4 and t.meta["iterations_done"] == 5
    # the root's visits: its value once per simulation (1 + 4) plus each terminal's backup (3)
    assert t.root.N == 8 and t.root.W == pytest.approx(-1 - 1 + 1)
    assert t.meta["correct"] is True and t.meta["first_correct_iteration"] == 5


def test_resampling_picks_the_exhausted_node_with_the_best_puct_and_inference_never_resamples():
    steps = {n: sample(f"{n}</step>", prior=p) for n, p in (("a", 0.9), ("b", 0.2))}
    policy = SeededPolicy({(): [[steps["a"], steps["b"]]], ("a",): [[WRONG], [WRONG], [RIGHT]],
                           ("b",): [[BROKEN]]})
    cfg = SearchConfig(n_children=2, iterations=12)
    t = solve("q", "mcts", policy, ConstValue(0.0), ScriptedSandbox(), cfg, ground_truth="7", check=exact,
              rewards=True)
    a = t.nodes[1]
    assert t.meta["correct"] is True and any(t.nodes[c].answer == "7" for c in a.children)
    assert [c for c in policy.calls if c[0] == ("b",)] == [(("b",), 2, cfg.temperature)]  # never re-opened
    policy = SeededPolicy({(): [[WRONG, BROKEN], [RIGHT]]})
    t = solve("q", "mcts", policy, ConstValue(0.0), ScriptedSandbox(), cfg, ground_truth="7", check=exact)
    assert len(policy.calls) == 1 and t.meta["resampled"] == 0  # without rewards: an exhausted tree ends
