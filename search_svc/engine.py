"""One entry point for every search method: question in, finished tree out."""
from __future__ import annotations

import time
from typing import Callable

from alphamath.interfaces import Policy, Sandbox, Value
from alphamath.search_config import METHODS, SearchConfig
from alphamath.tree import Tree
from search_svc.beam import greedy, majority, sbs
from search_svc.mcts import finish, mcts

MAX_QUESTION_CHARS = 4000


def check_question(question: str) -> str:
    """Reject what no search should run on, with a message a user can act on."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(f"question has {len(question)} characters; the limit is {MAX_QUESTION_CHARS}")
    return question.strip()


def default_checker():
    from alphamath.answer import is_equiv
    return is_equiv


def solve(question: str, method: str, policy: Policy, value: Value, sandbox: Sandbox,
          cfg: SearchConfig | None = None, ground_truth: str | None = None,
          question_id: str | None = None, on_progress: Callable[[int, Tree], None] | None = None,
          check=None, rewards: bool = False) -> Tree:
    """Search for a solution; the answer, its value and correctness land in tree.meta.

    `ground_truth` grades the chosen answer. Only with `rewards` (self-training data generation)
    does the search itself see it: MCTS terminals then back up +1/-1 instead of the value head's
    estimate. Evaluation and serving leave `rewards` off, or the accuracy would be the search's
    access to the answer rather than the model's."""
    question = check_question(question)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    cfg = (cfg or SearchConfig()).validate()
    check = check or default_checker()
    tree = Tree(question=question, prompt=policy.render_prompt(question),
                ground_truth=ground_truth, question_id=question_id)
    tree.meta.update(method=method, config=cfg.to_dict(), rewards=bool(rewards and ground_truth is not None))
    start = time.perf_counter()
    search_check = check if rewards else None  # without rewards the search cannot grade anything
    if method == "mcts":
        mcts(tree, policy, value, sandbox, cfg, search_check, on_progress)
    elif method == "sbs":
        sbs(tree, policy, value, sandbox, cfg, search_check, equiv=check, on_progress=on_progress)
    elif method == "greedy":
        greedy(tree, policy, value, sandbox, cfg, search_check, on_progress)
    else:
        majority(tree, policy, value, sandbox, cfg, search_check, equiv=check, on_progress=on_progress)
    chosen = tree.meta.get("answer_node")  # graded once the search is over (with rewards, already was)
    finish(tree, tree.nodes[chosen] if chosen is not None else None, check)
    tree.meta["seconds"] = round(time.perf_counter() - start, 3)
    tree.meta["sandbox_backend"] = sandbox.backend  # which sandbox ran the code: never left implicit
    return tree


class Stopped(RuntimeError):
    """A search of a stopped batch, ended at its next model call (its tree is dropped)."""


class _Stoppable:
    """The policy as the searches of one batch see it: once `stop` is set, a generate() call raises
    Stopped when it starts or returns, so a stopped batch ends within one model call per search
    rather than after every running search has spent its whole budget (minutes at N=20)."""

    def __init__(self, policy: Policy, stop):
        self._policy, self._stop = policy, stop

    def render_prompt(self, question: str) -> str:
        return self._policy.render_prompt(question)

    def generate(self, *args, **kwargs):
        if self._stop.is_set():
            raise Stopped("the batch was stopped")
        out = self._policy.generate(*args, **kwargs)
        if self._stop.is_set():
            raise Stopped("the batch was stopped")
        return out


def solve_many(problems, method: str, policy: Policy, value: Value, sandbox: Sandbox, cfg: SearchConfig,
               done_one: Callable, *, concurrency: int = 1, serve: Callable | None = None,
               rewards: bool = False, check=None, stop=None) -> None:
    """Solve every problem (objects with id, question, answer; the answer is a reward to the search
    only with `rewards`) and call `done_one(problem, tree, seconds)` as each finishes, on one thread
    at a time. With concurrency > 1 the searches run on worker threads, so their generate() calls
    share decode batches, while this thread runs the model's decode loop: `serve(until)`
    (LocalLM.serve; a remote policy needs none), which calls `until()` first once it serves.

    The first error, Ctrl-C (or SIGTERM as SystemExit) and `stop` (a threading.Event another thread
    may set) stop the batch: no new search starts, and each running one ends at its next model call
    without a tree. The finished trees are already handed over; the error is raised here."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    stop = stop or threading.Event()
    policy = _Stoppable(policy, stop)

    def run(p):
        t0 = time.perf_counter()
        tree = solve(p.question, method, policy, value, sandbox, cfg, ground_truth=p.answer,
                     question_id=p.id, rewards=rewards, check=check)
        return tree, time.perf_counter() - t0

    if concurrency <= 1 or len(problems) <= 1:
        for i, p in enumerate(problems):
            if stop.is_set():
                raise Stopped(f"stopped with {i} of {len(problems)} problems done")
            done_one(p, *run(p))
        return
    lock, all_done, errors, left, handed = threading.Lock(), threading.Event(), [], [len(problems)], [0]
    # Searches start once this thread serves: a search that called generate() before would run the decode
    # loop on its own thread, whose OpenMP pool would then slow every step (lm/scheduler.py).
    serving = threading.Event()
    if serve is None:
        serving.set()

    def until() -> bool:
        serving.set()  # serve() calls it first once it serves
        return all_done.is_set() or stop.is_set()

    def task(p):
        try:
            serving.wait()
            if stop.is_set():
                return
            tree, secs = run(p)
            with lock:
                done_one(p, tree, secs)
                handed[0] += 1
        except Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            errors.append(e)
            stop.set()
            all_done.set()
        finally:
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    all_done.set()

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="search") as pool:
        for p in problems:
            pool.submit(task, p)
        try:
            if serve is not None:
                serve(until)
            else:
                while not (all_done.wait(0.1) or stop.is_set()):
                    pass
        except BaseException as e:  # Ctrl-C: running searches end at their next model call
            stop.set()
            serving.set()
            errors.append(e)
            raise
    if errors:
        raise errors[0]
    if stop.is_set():
        raise Stopped(f"stopped with {handed[0]} of {len(problems)} problems done")
