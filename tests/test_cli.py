"""The CLI: bad input gives a clear message and a non-zero exit, never a traceback; eval reports."""
import json
import subprocess
import sys

import pytest

from app.cli import main
from alphamath.data import DataError, load_problems
from alphamath.render import tree_html, tree_text
from alphamath.steps import Step
from alphamath.tree import Tree


@pytest.mark.parametrize("argv,msg", [
    (["solve", ""], "question is empty"),
    (["solve", "x" * 5000], "limit is 4000"),
    (["solve", "2+2?", "--method", "astar"], "unknown method"),
    (["solve", "2+2?", "--iterations", "0"], "iterations"),
    (["eval", "--data", "/no/such.jsonl"], "does not exist"),
    (["solve", "2+2?", "--model", "/tmp"], "has no config.json"),
    (["show-tree", "/no/trees.jsonl"], "does not exist"),
])
def test_bad_input_exits_2_with_message(argv, msg, capsys):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_bad_concurrency_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--data", "d.jsonl", "--concurrency", "0"])
    assert e.value.code == 2 and "--concurrency: must be >= 1" in capsys.readouterr().err


def test_malformed_data_file_names_the_line(tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text('{"id": "a", "question": "1+1?", "answer": "2"}\n{"id": "b", "question": \n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        load_problems(f)
    assert main(["eval", "--data", str(f), "--method", "greedy"]) == 2
    assert "d.jsonl:2" in capsys.readouterr().err
    f.write_text('{"id": "a", "answer": "2"}\n')
    with pytest.raises(DataError, match=r":1: expected an object"):
        load_problems(f)


def test_no_traceback_from_the_console_script():
    r = subprocess.run([sys.executable, "-m", "app.cli", "solve", "   "], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "question is empty" in r.stderr


def test_show_tree_text_and_html(tmp_path, capsys):
    t = Tree(question="What is 1 < 2?", prompt="P<step>", ground_truth="yes", question_id="q1")
    n = t.add_child(0, Step("Compare </script>", "answer", answer="yes"), 0.5)
    n.terminal_reason, n.correct = "answer", True
    f = tmp_path / "trees.jsonl"
    f.write_text(t.to_json() + "\n")
    page = tmp_path / "t.html"
    assert main(["show-tree", str(f), "--id", "q1", "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert "answer='yes' ✓" in out and "Compare" in out
    html = page.read_text()
    data = html.split('<script type="application/json" id="tree">')[1].split("</script>")[0]
    assert Tree.from_json(data.replace("<\\/", "</")).to_json() == t.to_json()
    assert "&lt;/script&gt;" in html
    assert main(["show-tree", str(f), "--id", "nope"]) == 2
    assert "q1" in tree_text(t) or "What is" in tree_text(t)
    assert tree_html(t).startswith("<!doctype html>")


def test_eval_writes_each_question_as_it_is_done(tiny_model_dir, tmp_path, capsys):
    """eval on the tiny model: the JSON report holds every question's answer, correctness and time,
    and is rewritten after each question (a stopped run keeps what it measured)."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(dict(id=f"q{i}", question=f"What is {i} + 1?", answer=str(i + 1))) + "\n"
                            for i in range(2)))
    out = tmp_path / "report.json"
    assert main(["eval", "--data", str(data), "--method", "greedy,majority", "--k", "2", "--max-new-tokens", "8",
                 "--model", str(tiny_model_dir), "--dtype", "fp32", "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["method"] for r in report] == ["greedy", "majority"]
    for r in report:
        assert r["n"] == r["done"] == 2 and [q["id"] for q in r["questions"]] == ["q0", "q1"]
        assert r["correct"] == sum(q["correct"] for q in r["questions"])
        assert {q["ground_truth"] for q in r["questions"]} == {"1", "2"}
        assert r["seconds_per_question"] > 0
    # peak RSS of the process so far: at least what torch and the model take, and non-decreasing
    assert 50 < report[0]["peak_rss_mb"] <= report[1]["peak_rss_mb"]
    printed = capsys.readouterr().out
    assert "greedy" in printed and "peak RSS MB" in printed


def test_concurrent_eval_and_generate_keep_every_question(tiny_model_dir, tmp_path):
    """--concurrency 3: searches run on worker threads and share decode batches while the main
    thread decodes; every question is reported (eval) and every tree written once (generate), with
    the answers a one-at-a-time run gives (each sample's randomness comes from its own seed)."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(dict(id=f"q{i}", question=f"What is {i} + 1?", answer=str(i + 1))) + "\n"
                            for i in range(4)))
    common = ["--data", str(data), "--max-new-tokens", "8", "--model", str(tiny_model_dir), "--dtype", "fp32"]
    reports = {}
    for c in ("1", "3"):
        out = tmp_path / f"report{c}.json"
        assert main(["eval", *common, "--method", "sbs", "--b1", "2", "--b2", "2", "--concurrency", c,
                     "--json-out", str(out)]) == 0
        reports[c] = json.loads(out.read_text())[0]
    assert reports["3"]["concurrency"] == 3 and reports["3"]["done"] == 4
    answers = {c: {q["id"]: q["answer"] for q in r["questions"]} for c, r in reports.items()}
    assert answers["3"] == answers["1"] and sorted(answers["3"]) == ["q0", "q1", "q2", "q3"]
    trees = tmp_path / "trees.jsonl"
    assert main(["generate", *common, "--iterations", "3", "--n-children", "2", "--concurrency", "3",
                 "--out", str(trees)]) == 0
    ids = [json.loads(line)["question_id"] for line in trees.read_text().splitlines()]
    assert sorted(ids) == ["q0", "q1", "q2", "q3"]
