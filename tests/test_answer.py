"""Answer checking: the table of hard MATH-style pairs, timeouts, threads, worker recovery."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from alphamath import answer
from alphamath.answer import is_equiv, normalize_answer

PAIRS_PATH = Path(__file__).parent / "data" / "answer_pairs.jsonl"
PAIRS = [json.loads(line) for line in PAIRS_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
PATHOLOGICAL = "9^{9^{9^{9}}}"


@pytest.fixture(scope="module", autouse=True)
def workers():
    """Warm symbolic workers for the module (as services do at start-up), killed afterwards."""
    answer.warmup()
    yield
    answer.shutdown()


def test_table_is_large_and_balanced():
    assert len(PAIRS) >= 80
    assert sum(r["equal"] for r in PAIRS) >= 30
    assert sum(not r["equal"] for r in PAIRS) >= 30


@pytest.mark.parametrize("row", PAIRS, ids=[f"{i:03d}-{r['note']}" for i, r in enumerate(PAIRS)])
def test_pair(row):
    assert is_equiv(row["pred"], row["truth"]) is row["equal"], row["note"]


@pytest.mark.parametrize(
    "variants",
    [
        ["0.5", ".50", "\\dfrac{1}{2}", "\\frac12", "\\boxed{1/2}", "$\\tfrac{1}{2}$"],
        ["1000", "1,000", "1{,}000", "\\$1,\\!000", "1000 \\text{ dollars}", "1.0e3"],
        ["30", "30^\\circ", "30^{\\circ}", "30 degrees", "30\\%"],
        ["C", "\\text{(C)}", "(C)", "\\textbf{C}"],
        ["A,C,F", "\\text{ACF}", "F, C, A", "A, C, and F"],
    ],
)
def test_normalize_answer_gives_one_voting_key(variants):
    keys = {normalize_answer(v) for v in variants}
    assert len(keys) == 1, keys


def test_normalize_answer_is_idempotent_and_keeps_structure():
    for row in PAIRS:
        once = normalize_answer(row["truth"])
        assert normalize_answer(once) == once
    assert normalize_answer("\\left( 1, 3 \\right]") == "(1,3]"
    assert normalize_answer("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}") == "\\begin{pmatrix}1\\\\2\\end{pmatrix}"
    assert normalize_answer("-\\frac{6}{4}") == "-\\frac{3}{2}"


def test_missing_or_bad_input():
    assert is_equiv(None, "5") is False
    assert is_equiv("   ", "5") is False
    assert is_equiv("\\boxed{", "5") is False
    with pytest.raises(TypeError):
        is_equiv("5", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        is_equiv(5, "5")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        is_equiv("5", "5", timeout_s=0)
    with pytest.raises(TypeError):
        normalize_answer(None)  # type: ignore[arg-type]


def test_list_truth_means_any_of():
    # math-2913 in the MATH training split: either vertex is accepted (its JSON also lost the
    # backslash of "\\tfrac", leaving a TAB, which normalisation repairs)
    truth = ["\\left(\tfrac32, -\\tfrac52\\right)", "\\left(-\\tfrac52, -\\tfrac52\\right)"]
    assert is_equiv("(-2.5, -2.5)", truth) is True
    assert is_equiv("\\left(\\frac{3}{2}, -\\frac{5}{2}\\right)", truth) is True
    assert is_equiv("(2.5, -2.5)", truth) is False
    with pytest.raises(TypeError):
        is_equiv("1", [])


def test_runaway_answer_is_not_parsed():
    long = "1+" * 5000 + "1"
    assert is_equiv(long, "5001") is False
    assert is_equiv(long, long) is True


def test_numeric_answers_never_reach_sympy():
    before = answer.stats()
    assert is_equiv("1,234", "1234")
    assert not is_equiv("0.33", "\\frac13")
    assert is_equiv("\\$4.50", "4.5")
    after = answer.stats()
    assert after["fast"] - before["fast"] == 3
    assert after["symbolic"] == before["symbolic"] and after["cached"] == before["cached"]


def test_symbolic_results_are_cached():
    pred, truth = "3(a+7)", "3a+21"
    assert is_equiv(pred, truth)
    before = answer.stats()["cached"]
    assert is_equiv(pred, truth)
    assert answer.stats()["cached"] == before + 1


def test_pathological_input_times_out_and_the_worker_recovers():
    answer.warmup()  # measure the deadline, not a worker's start-up
    t0 = time.monotonic()
    assert is_equiv(PATHOLOGICAL, "1", timeout_s=1.0) is False
    assert time.monotonic() - t0 < 30.0  # cut off by the timeout (sympy alone does not finish it); room for a loaded machine
    # the killed worker was replaced; symbolic checks work again
    assert is_equiv("(x+1)^2", "x^2+2x+1") is True


def test_timeout_from_a_non_main_thread():
    answer.warmup()
    result: dict[str, object] = {}

    def run():
        t0 = time.monotonic()
        result["equal"] = is_equiv(PATHOLOGICAL, "2", timeout_s=1.0)
        result["elapsed"] = time.monotonic() - t0

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert result["equal"] is False
    assert result["elapsed"] < 30.0  # cut off by the timeout (sympy alone does not finish it)


def test_concurrent_checks_from_a_thread_pool_agree_with_the_table():
    rows = PAIRS * 2 + [{"pred": PATHOLOGICAL, "truth": "7", "equal": False}]
    answer._SYM_CACHE.clear()  # make the threads really share the workers

    def check(row):
        # the pathological row must be cut off by its timeout; the table's rows get time to spare, so
        # a loaded machine cannot turn a slow "equal" into a timed-out "not equal"
        timeout = 1.0 if row["pred"] is PATHOLOGICAL else 60.0
        return is_equiv(row["pred"], row["truth"], timeout_s=timeout) is row["equal"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(check, rows))
    assert all(results), [r for r, ok in zip(rows, results) if not ok]


def test_a_crashed_worker_is_replaced():
    pool = answer._pool()
    procs = [w._proc for w in pool._all if w._proc is not None]
    assert procs
    for proc in procs:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    answer._SYM_CACHE.clear()
    # a dead worker is noticed before the request is sent and respawned, so no check is lost
    for k in range(2 * len(procs)):
        assert is_equiv(f"\\sqrt{{{2 * (k + 2) ** 2}}}", f"{k + 2}\\sqrt{{2}}") is True
    answer.warmup()  # re-readies every worker, replacing the dead one the LIFO pool did not touch
    alive = [w._proc for w in pool._all]
    assert all(p is not None and p.poll() is None for p in alive)
    assert not {p.pid for p in alive} & {p.pid for p in procs}


def test_cli_check():
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run(
        [sys.executable, "-m", "alphamath.answer", "check", "1,000", "1000"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert out.returncode == 0 and out.stdout.strip() == "equal"
