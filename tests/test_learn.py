"""The learning benchmark end to end on the tiny random Llama: one round, two problems per set."""
import json

import pytest

from alphamath.data import load_problems
from trainer_svc.learn import LearnConfig, coverage, paired, run, split, table, training_pool
from trainer_svc.promote import EvalConfig, eval_fingerprint
from trainer_svc.store import Store
from alphamath.tree import Tree


def test_split_and_coverage_arithmetic():
    outcomes = {"greedy": {"a1": True, "a2": False, "h1": True}, "sbs": {"a1": False, "a2": False, "h1": True}}
    acc = split(outcomes, {"arith": ["a1", "a2"], "hand": ["h1"]})
    assert acc == {"arith_greedy": 0.5, "arith_sbs": 0.0, "hand_greedy": 1.0, "hand_sbs": 1.0}
    trees = [Tree(question="q", prompt="p", meta={"first_correct_iteration": f}) for f in (3, 12, None, 25)]
    assert coverage(trees, [10, 20, 40]) == {"N=10": 0.25, "N=20": 0.5, "N=40": 0.75}


def test_every_round_draws_its_gsm8k_problems_from_the_same_easiest_set(tmp_path):
    from alphamath.data import easiest, load_problems
    rows = [{"id": f"g{i}", "question": "x " * (i + 1) + "has 2 and 3?", "answer": "5"} for i in range(40)]
    arith = [{"id": f"a{i}", "question": f"{i} + 1?", "answer": str(i + 1)} for i in range(40)]
    for name, data in (("g.jsonl", rows), ("a.jsonl", arith)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in data))
    cfg = LearnConfig(rounds=3, k=8, gsm8k_train=str(tmp_path / "g.jsonl"), arith_train=str(tmp_path / "a.jsonl"))
    pool = training_pool(cfg)
    assert len(pool) == 24 and [p.id for p in pool[0::2]] == [f"a{i}" for i in range(12)]
    gs = [p.id for p in pool[1::2]]
    assert set(gs) == {p.id for p in easiest(load_problems(cfg.gsm8k_train), 12)}  # the 12 easiest, no other
    assert gs != sorted(gs, key=lambda i: int(i[1:]))  # shuffled: round 1 does not take the easiest 4
    assert [p.id for p in training_pool(cfg)] == [p.id for p in pool]  # seeded
    one = training_pool(LearnConfig(**{**cfg.__dict__, "rounds": 1}))  # a 1-round run: the 3-round run's first round
    assert [p.id for p in one[:8]] == [p.id for p in pool[:8]] and len(one) == len(pool)


def test_paired_comparisons_count_discordant_problems():
    ids = [f"q{i}" for i in range(10)]
    base = {"greedy": {i: k < 2 for k, i in enumerate(ids)}, "sbs": {i: k < 3 for k, i in enumerate(ids)}}
    base["sbs_zero"] = base["sbs"]
    r1 = {"greedy": {i: k < 6 for k, i in enumerate(ids)},     # +4 problems, none lost
          "sbs": {i: 1 <= k < 4 for k, i in enumerate(ids)},   # wins q3, loses q0: net 0
          "sbs_zero": {i: k < 1 for k, i in enumerate(ids)},
          "sbs_distinct": {i: k < 2 for k, i in enumerate(ids)}}  # the same SBS trees, one vote a distinct step
    report = {"rows": [{"round": 0, "outcomes": base}, {"round": 1, "outcomes": r1}]}
    got = {(c["round"], c["a"], c["b"]): c for c in paired(report)}
    assert set(got) == {(0, "sbs", "greedy"), (1, "greedy", "round 0 greedy"), (1, "sbs", "round 0 sbs"),
                        (1, "sbs_zero", "round 0 sbs_zero"), (1, "sbs", "sbs_zero"), (1, "sbs", "greedy"),
                        (1, "sbs", "sbs_distinct")}
    d = got[(1, "sbs", "sbs_distinct")]
    assert (d["a_only"], d["b_only"], d["points"]) == (2, 1, 10.0)
    g = got[(1, "greedy", "round 0 greedy")]
    assert (g["a_only"], g["b_only"], g["n"], g["points"]) == (4, 0, 10, 40.0)
    assert g["p_value"] == 2 / 16  # all 4 discordant problems on one side: 2 * (1/2)^4
    s = got[(1, "sbs", "round 0 sbs")]
    assert (s["a_only"], s["b_only"], s["points"], s["p_value"]) == (1, 1, 0.0, 1.0)
    z = got[(1, "sbs", "sbs_zero")]
    assert (z["a_only"], z["b_only"], z["points"]) == (3, 1, 20.0)
    assert got[(1, "sbs", "greedy")]["points"] == -30.0
    report.update(config={"iterations": 2}, sets={"arith": 5, "hand": 5})
    for r in report["rows"]:
        r.update(checkpoint="c", acc={})
    assert "round 1: greedy vs round 0 greedy: +40.0 points (4 won, 0 lost of 10), p = 0.125" in table(report)


def test_one_round_writes_report_and_learning_curve(tiny_model_dir, tmp_path):
    cfg = LearnConfig(rounds=1, k=2, iterations=2, n_children=2, max_new_tokens=8, epochs=1, b1=1, b2=2,
                      eval_limit=2, concurrency=2, dir=str(tmp_path / "learn"), model=str(tiny_model_dir),
                      dtype="fp32")
    lines = []
    report = run(cfg, say=lines.append)
    rows = report["rows"]
    assert [r["round"] for r in rows] == [0, 1]
    for r in rows:
        methods = ("greedy", "sbs", "sbs_zero", "sbs_distinct")
        assert set(r["acc"]) == {f"{s}_{m}" for s in ("arith", "hand") for m in methods}
        assert all(len(v) == 4 for v in r["outcomes"].values())  # 2 + 2 held-out problems
    assert rows[0]["value_next"]["trees"] == 2  # the base head on round 1's fresh trees
    assert rows[1]["trees"] == 2 and set(rows[1]["coverage"]) == {"N=1", "N=2"}
    assert (tmp_path / "learn" / "learning.png").stat().st_size > 0
    assert {(c["round"], c["a"], c["b"]) for c in report["paired"]} >= {(1, "greedy", "round 0 greedy"), (1, "sbs", "sbs_zero")}
    # the evaluations (and so the gate) sampled SBS at sbs_temperature: the stored base evaluation is keyed by it
    store = Store(f"sqlite:///{tmp_path / 'learn' / 'trainer.db'}")
    try:
        sets = {c.metrics.get("eval_set") for c in store.checkpoints() if c.metrics}
    finally:
        store.close()
    problems = load_problems(tmp_path / "learn" / "heldout.jsonl")
    search = {"beam_b1": 1, "beam_b2": 2, "max_new_tokens": 8}
    assert eval_fingerprint(problems, EvalConfig(search={**search, "temperature": cfg.sbs_temperature})) in sets
    assert eval_fingerprint(problems, EvalConfig(search=search)) not in sets
    saved = json.loads((tmp_path / "learn" / "report.json").read_text())
    assert [r["round"] for r in saved["rows"]] == [0, 1]
    again = run(cfg, say=lines.append)  # resumable: a finished stage is not run again
    assert [r["round"] for r in again["rows"]] == [0, 1] and again["seconds"] == saved["seconds"]
    # how many problems run at once changes no result: a run resumes with other concurrency settings;
    # any other setting is refused, not mixed into the report
    faster = run(LearnConfig(**{**cfg.__dict__, "concurrency": 3, "search_concurrency": 5}), say=lines.append)
    assert faster["rows"] == again["rows"] and faster["config"]["search_concurrency"] == 5
    with pytest.raises(ValueError, match="other settings"):
        run(LearnConfig(**{**cfg.__dict__, "iterations": 3}), say=lines.append)
    # a finished run goes on with more rounds: its rows stay, round 2 takes fresh problems
    longer = run(LearnConfig(**{**cfg.__dict__, "rounds": 2}), say=lines.append)
    assert [r["round"] for r in longer["rows"]] == [0, 1, 2] and longer["rows"][0] == faster["rows"][0]
    assert {k: v for k, v in longer["rows"][1].items() if k != "value_next"} == faster["rows"][1]
    assert longer["rows"][1]["value_next"]["trees"] == 2  # round 1's head, now on round 2's fresh trees
    assert longer["seconds"]["round1"] == saved["seconds"]["round1"]
    r1 = longer["rows"][1]
    assert longer["rows"][2]["base"] == (r1["checkpoint"] if r1["promoted"] is True else r1["base"])
