"""solve_many stops a batch within one model call per running search: on the first error, on
Ctrl-C in the thread that serves the decode loop, and when a caller sets `stop`.

The policy is scripted; its calls after the first wait for the batch's `stop` event (failing after
30 s), so a search that does not end once `stop` is set shows up as a timeout, not as a flaky race."""
import threading
from types import SimpleNamespace

import pytest

from alphamath.search_config import SearchConfig
from search_svc.engine import Stopped, solve_many
from tests.fakes import ConstValue, ScriptedSandbox, sample

CFG = SearchConfig(iterations=50, n_children=2, max_depth=40)
STEP = sample("A</step>", prior=0.5)


class BlockingPolicy:
    """`bad` questions raise at their first call; the others answer one call at once, and every
    later call only once `stop` is set."""

    def __init__(self, stop: threading.Event):
        self.stop, self.calls, self.first_call = stop, {}, threading.Event()
        self.lock = threading.Lock()

    def render_prompt(self, question):
        return f"Q: {question}\n<step>"

    def generate(self, prompts, n, **_):
        question = prompts[0].split("\n")[0][3:]
        with self.lock:
            self.calls[question] = self.calls.get(question, 0) + 1
            nth = self.calls[question]
        if question.startswith("bad"):
            raise ValueError(f"{question} failed")
        if nth > 1:
            assert self.stop.wait(30), "the batch was never stopped"
        self.first_call.set()
        return [[STEP] * n for _ in prompts]


def problems(*names):
    return [SimpleNamespace(id=n, question=n, answer="7") for n in names]


def run(policy, names, stop, **kw):
    done = []
    solve_many(problems(*names), "mcts", policy, ConstValue(0.0), ScriptedSandbox(), CFG,
               lambda p, tree, secs: done.append(p.id), stop=stop, **kw)
    return done


def test_the_first_error_stops_the_running_searches():
    stop = threading.Event()
    policy = BlockingPolicy(stop)
    with pytest.raises(ValueError, match="bad failed"):
        run(policy, ["good", "bad"], stop, concurrency=2)
    assert policy.calls["good"] <= 2  # it ended at its next model call, not after 50 iterations
    assert stop.is_set()


def test_ctrl_c_in_the_decode_loop_stops_the_batch():
    stop = threading.Event()
    policy = BlockingPolicy(stop)

    def serve(until):
        assert not until()  # as LocalLM.serve does once it serves: the searches start now
        assert policy.first_call.wait(30)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(policy, ["good-1", "good-2", "good-3"], stop, concurrency=2, serve=serve)
    assert sum(policy.calls.values()) <= 4 and "good-3" not in policy.calls  # no new search started


def test_a_caller_can_stop_the_batch_and_keeps_what_finished():
    stop = threading.Event()
    policy = BlockingPolicy(stop)
    cfg_done = []

    def done_one(p, tree, secs):
        cfg_done.append(p.id)
        stop.set()  # e.g. a user's cancel after the first tree

    one_call = SearchConfig(iterations=1, n_children=2, max_depth=40)
    with pytest.raises(Stopped, match="1 of 3 problems done"):
        solve_many(problems("first", "second", "third"), "mcts", policy, ConstValue(0.0), ScriptedSandbox(),
                   one_call, done_one, stop=stop)
    assert cfg_done == ["first"] and set(policy.calls) == {"first"}
