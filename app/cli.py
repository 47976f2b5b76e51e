"""`alphamath` command line: solve, generate trees, evaluate, show trees, talk to a stack."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from alphamath.search_config import METHODS, SearchConfig


class CliError(Exception):
    pass


def _config(a) -> SearchConfig:
    return SearchConfig(iterations=a.iterations, n_children=a.n_children, temperature=a.temperature,
                        max_new_tokens=a.max_new_tokens, c_puct=a.c_puct, max_depth=a.max_depth,
                        beam_b1=a.b1, beam_b2=a.b2, majority_k=a.k, select_by=a.select_by,
                        leaves_per_call=a.leaves_per_call, seed=a.seed).validate()


def _engine(a):
    if a.model:
        d = Path(a.model)
        if not d.is_dir():
            raise CliError(f"model dir {d} does not exist")
        if not (d / "config.json").is_file() or not any(d.glob("*.safetensors")) and not any(d.glob("*.bin")):
            raise CliError(f"model dir {d} has no config.json and weights (*.safetensors); "
                           "pass an HF checkpoint directory")
    from alphamath.runtime import load_engine
    return load_engine(a.model, a.dtype)


def _methods(s: str) -> list[str]:
    methods = [m.strip() for m in s.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise CliError(f"unknown method {', '.join(bad) or s!r}; choose from {', '.join(METHODS)}")
    return methods


def cmd_model(a):
    from alphamath.model import embedded_checkpoint
    print(embedded_checkpoint())


def cmd_solve(a):
    from alphamath.render import solution_text, tree_json_pretty
    from search_svc.engine import check_question, solve
    method = _methods(a.method)[0]
    check_question(a.question)
    cfg = _config(a)
    eng = _engine(a)
    tree = solve(a.question, method, eng.policy, eng.value, eng.sandbox, cfg, ground_truth=a.ground_truth)
    if a.json:
        print(tree_json_pretty(tree))
        return
    print(f"Question: {tree.question}\n")
    print(solution_text(tree, tree.meta.get("answer_node")))
    value = tree.meta.get("value")
    print(f"\nAnswer: {tree.meta.get('answer')}   value: {value if value is None else round(value, 3)}"
          f"   ({method}, {len(tree.nodes) - 1} steps explored, {tree.meta['seconds']} s, "
          f"sandbox {tree.meta.get('sandbox_backend')})")
    if a.ground_truth is not None:
        print(f"Ground truth: {a.ground_truth}   correct: {tree.meta.get('correct')}")


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="q", file=sys.stderr, dynamic_ncols=True)


def _solve_each(eng, problems, method: str, cfg, concurrency: int, done_one, rewards: bool = False) -> None:
    """search_svc.engine.solve_many on the loaded engine; its decode loop runs on this thread."""
    from search_svc.engine import solve_many
    solve_many(problems, method, eng.policy, eng.value, eng.sandbox, cfg, done_one, concurrency=concurrency,
               serve=getattr(eng.lm, "serve", None), rewards=rewards)


def cmd_generate(a):
    """MCTS with ground truth; each tree is appended as soon as it is done, and a rerun skips
    questions already in --out, so an interrupted run loses nothing."""
    from alphamath.data import load_problems
    problems = load_problems(a.data, a.limit)
    cfg = _config(a)
    out = Path(a.out)
    done = set()
    if out.exists():
        for i, line in enumerate(out.open(encoding="utf-8"), 1):
            try:
                done.add(json.loads(line)["question_id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CliError(f"{out}:{i}: not a tree written by alphamath generate") from None
    todo = [p for p in problems if p.id not in done]
    eng = _engine(a)
    correct = 0
    with out.open("a", encoding="utf-8") as f, _progress(len(todo), "generate") as bar:
        def write(p, tree, secs):
            nonlocal correct
            tree.meta["checkpoint"] = str(eng.model_dir)
            f.write(tree.to_json() + "\n")
            f.flush()
            correct += any(n.correct for n in tree.nodes)
            bar.update(1)
            bar.set_postfix(with_correct_path=f"{correct}/{bar.n}")

        _solve_each(eng, todo, "mcts", cfg, a.concurrency, write, rewards=True)
    from alphamath.runtime import peak_rss_mb
    print(f"wrote {len(todo)} trees to {out} ({len(done)} already there); "
          f"{correct}/{len(todo)} have a correct path; peak RSS {peak_rss_mb():.0f} MB")


def cmd_eval(a):
    """Accuracy per method. With --json-out the report is rewritten after every question (with each
    question's answer, correctness and time), so a long run that is stopped keeps what it measured."""
    from alphamath.data import load_problems
    from alphamath.runtime import peak_rss_mb
    problems = load_problems(a.data, a.limit)
    methods = _methods(a.method)
    cfg = _config(a)
    eng = _engine(a)
    report = []
    for m in methods:
        # seconds_per_question is wall time over questions done: with --concurrency it is throughput,
        # while each question's own "seconds" is its latency
        row = dict(method=m, concurrency=a.concurrency, correct=0, n=len(problems), done=0,
                   seconds_per_question=0.0, memory_budget_mb=eng.lm.budget.total_bytes >> 20, questions=[])
        report.append(row)
        t0 = time.perf_counter()
        with _progress(len(problems), m) as bar:
            def record(p, tree, secs):
                ok = bool(tree.meta.get("correct"))
                row["questions"].append(dict(id=p.id, answer=tree.meta.get("answer"), ground_truth=p.answer,
                                             correct=ok, seconds=round(secs, 2)))
                row["correct"] += ok
                row["done"] += 1
                row["seconds_per_question"] = (time.perf_counter() - t0) / row["done"]
                row["peak_rss_mb"] = peak_rss_mb()  # of the process so far (methods run in order)
                bar.update(1)
                bar.set_postfix(correct=f"{row['correct']}/{row['done']}")
                if a.json_out:
                    Path(a.json_out).write_text(json.dumps(report, indent=2))

            _solve_each(eng, problems, m, cfg, a.concurrency, record)
    print(f"\n{'method':<10} {'correct':>8} {'accuracy':>9} {'s/question':>11} {'peak RSS MB':>12}")
    for r in report:
        c, n = r["correct"], r["n"]
        print(f"{r['method']:<10} {c:>4}/{n:<3} {c / n:>9.1%} {r['seconds_per_question']:>11.2f} "
              f"{r.get('peak_rss_mb', peak_rss_mb()):>12.0f}")


def read_trees(path: str | Path) -> list:
    """Trees from a JSON-lines file (one Tree.to_json() per line); errors name the line."""
    from alphamath.tree import Tree
    path = Path(path)
    if not path.is_file():
        raise CliError(f"trees file {path} does not exist")
    out = []
    for i, line in enumerate(path.open(encoding="utf-8"), 1):
        if not line.strip():
            continue
        try:
            out.append(Tree.from_dict(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CliError(f"{path}:{i}: not a tree ({e})") from None
    if not out:
        raise CliError(f"{path}: no trees")
    return out


def cmd_value_report(a):
    """Judge a value head on finished data-generation trees it was not trained on: ROC AUC at
    answer nodes, MSE against each visited step's Q beside the best constant, calibration."""
    from alphamath.metrics import plot_reliability, value_report
    from search_svc.engine import default_checker
    trees = read_trees(a.trees)
    if not any(t.ground_truth is not None for t in trees):
        raise CliError(f"{a.trees}: no tree has a ground truth; generate them with `alphamath generate`")
    eng = _engine(a)
    with _progress(len(trees), "value-report") as bar:
        rep = value_report(trees, eng.value, check=default_checker(), progress=lambda i: bar.update(1))
    d = {"model": str(eng.model_dir), "trees_file": str(a.trees), **rep.to_dict()}
    if not a.per_tree:
        d.pop("per_tree")
    if a.plot:
        plot_reliability(rep, a.plot, title=f"value head of {Path(str(eng.model_dir)).name}")
    if a.json:
        print(json.dumps(d, indent=2))
        return
    print(f"model: {eng.model_dir}")
    print(rep.summary())
    print(f"\n{'predicted value':<18} {'n':>5} {'P(correct) pred':>16} {'observed':>9}")
    for b in rep.reliability:
        if b["n"]:
            print(f"[{b['lo']:+.1f}, {b['hi']:+.1f}){'':<6} {b['n']:>5} {b['predicted']:>16.3f} {b['observed']:>9.3f}")
    if a.plot:
        print(f"\nreliability diagram written to {a.plot}")


def cmd_show_tree(a):
    from alphamath.render import tree_html, tree_text
    from alphamath.tree import Tree
    path = Path(a.trees)
    if not path.is_file():
        raise CliError(f"trees file {path} does not exist")
    found = None
    for i, line in enumerate(path.open(encoding="utf-8"), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise CliError(f"{path}:{i}: not valid JSON") from None
        if a.id is None or row.get("question_id") == a.id:
            found = Tree.from_dict(row)
            break
    if found is None:
        raise CliError(f"no tree with id {a.id!r} in {path}")
    print(tree_text(found))
    if a.html:
        Path(a.html).write_text(tree_html(found), encoding="utf-8")
        print(f"\nHTML written to {a.html}")


def cmd_demo(a):
    from alphamath.data import load_problems
    from alphamath.render import solution_text
    from search_svc.engine import solve
    problems = load_problems(a.data, a.limit)
    eng = _engine(a)
    cfg = _config(a)
    print(f"model: {eng.model_dir}  sandbox: {getattr(eng.sandbox, 'backend', '?')}  method: {a.method}\n")
    for p in problems:
        tree = solve(p.question, _methods(a.method)[0], eng.policy, eng.value, eng.sandbox, cfg,
                     ground_truth=p.answer, question_id=p.id)
        print("=" * 80)
        print(f"[{p.id}] {p.question}\n")
        print(solution_text(tree, tree.meta.get("answer_node")))
        print(f"\nanswer: {tree.meta.get('answer')}  ground truth: {p.answer}  correct: {tree.meta.get('correct')}"
              f"  ({len(tree.nodes) - 1} steps explored, {tree.meta['seconds']} s)\n")


def _search_args(p: argparse.ArgumentParser, method_default: str | None = "mcts"):
    d = SearchConfig()
    if method_default:
        p.add_argument("--method", default=method_default, help=f"one of {', '.join(METHODS)} (eval: comma list)")
    p.add_argument("--model", help="HF checkpoint dir (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], help="default: from the CPU (bf16 with AVX512-BF16)")
    p.add_argument("--iterations", type=int, default=d.iterations)
    p.add_argument("--n-children", type=int, default=d.n_children)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--c-puct", type=float, default=d.c_puct)
    p.add_argument("--max-depth", type=int, default=d.max_depth)
    p.add_argument("--leaves-per-call", type=int, default=d.leaves_per_call,
                   help="MCTS: leaves selected (with a virtual loss) and expanded per model call; 1 is the paper's search")
    p.add_argument("--b1", type=int, default=d.beam_b1)
    p.add_argument("--b2", type=int, default=d.beam_b2)
    p.add_argument("--k", type=int, default=d.majority_k, help="majority vote samples")
    p.add_argument("--select-by", choices=["q", "value", "visits"], default=d.select_by)
    p.add_argument("--seed", type=int, default=d.seed)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return v


def _concurrency_arg(p: argparse.ArgumentParser):
    p.add_argument("--concurrency", type=_positive, default=1,
                   help="questions searched at once; their model calls share decode batches")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="alphamath", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("model", help="materialise the embedded model and print its directory").set_defaults(fn=cmd_model)
    p = sub.add_parser("solve", help="solve one question")
    p.add_argument("question")
    p.add_argument("--ground-truth", help="grade the answer against this (the search never sees it)")
    p.add_argument("--json", action="store_true", help="print the whole tree as JSON")
    _search_args(p, "sbs")
    p.set_defaults(fn=cmd_solve)
    p = sub.add_parser("generate", help="MCTS with ground truth over a data file; writes trees")
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int)
    p.add_argument("--out", required=True)
    _search_args(p, None)
    _concurrency_arg(p)
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("eval", help="accuracy table of methods on a data file")
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int)
    p.add_argument("--json-out")
    _search_args(p, "greedy")
    _concurrency_arg(p)
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("show-tree", help="render a tree as text (and HTML)")
    p.add_argument("trees")
    p.add_argument("--id")
    p.add_argument("--html", help="write a self-contained HTML page here")
    p.set_defaults(fn=cmd_show_tree)
    p = sub.add_parser("value-report", help="AUC, MSE vs a constant and calibration of a value head on trees")
    p.add_argument("--trees", required=True, help="JSON-lines trees from `alphamath generate` (ground truth known)")
    p.add_argument("--model", help="HF checkpoint dir whose value head is judged (default: the embedded model)")
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16"])
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--per-tree", action="store_true", help="with --json: each tree's predictions and targets")
    p.add_argument("--plot", help="write the reliability diagram as a PNG here")
    p.set_defaults(fn=cmd_value_report)
    p = sub.add_parser("demo", help="solve a few problems and print them")
    p.add_argument("--data", default="../shared/data/gsm8k/dev.jsonl")
    p.add_argument("--limit", type=int, default=3)
    _search_args(p, "sbs")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("client", help="talk to a running stack (alphamath client --help)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=lambda a: __import__("app.client", fromlist=["main"]).main(a.rest))
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        rc = a.fn(a)
        return rc if isinstance(rc, int) else 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
