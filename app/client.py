"""`alphamath client ...`: talk to a running stack over gRPC.

    alphamath client solve "What is 3 * 4 + 1?" --method sbs [--stream] [--json] [--addr HOST:PORT]
    alphamath client generate --data ../shared/data/gsm8k/dev.jsonl --limit 4 [--concurrency 2]
    alphamath client health [--host 127.0.0.1]

The search address defaults to ALPHAMATH_SEARCH_ADDR or 127.0.0.1:50053. Errors from the server
are printed with their status code (e.g. INVALID_ARGUMENT: question is empty) and exit status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alphamath.convert import method_to_pb, parameters_to_pb
from alphamath.pb import search_pb2, search_pb2_grpc
from alphamath.service import GRPC_PORTS
from alphamath.search_config import METHODS, SELECT_BY

DEFAULT_SEARCH_ADDR = f"127.0.0.1:{GRPC_PORTS['search']}"
PARAM_FLAGS = ("iterations", "n_children", "c_puct", "temperature", "top_p", "max_new_tokens", "max_depth",
               "max_code_errors", "beam_b1", "beam_b2", "majority_k", "select_by", "seed")


def search_stub(addr: str) -> tuple[grpc.Channel, search_pb2_grpc.SearchServiceStub]:
    channel = grpc.insecure_channel(addr)
    return channel, search_pb2_grpc.SearchServiceStub(channel)


def solve_request(question: str, method: str = "sbs", parameters: dict | None = None,
                  ground_truth: str | None = None, question_id: str | None = None,
                  include_tree: bool = False) -> search_pb2.SolveRequest:
    req = search_pb2.SolveRequest(question=question, method=method_to_pb(method),
                                  parameters=parameters_to_pb(parameters or {}), include_tree=include_tree)
    if ground_truth is not None:
        req.ground_truth = ground_truth
    if question_id is not None:
        req.question_id = question_id
    return req


def solve(addr: str, question: str, method: str = "sbs", parameters: dict | None = None,
          timeout_s: float | None = 600.0, **kw) -> search_pb2.SolveResponse:
    """One Solve call (raises grpc.RpcError with the server's status)."""
    channel, stub = search_stub(addr)
    with channel:
        return stub.Solve(solve_request(question, method, parameters, **kw), timeout=timeout_s)


def solve_stream(addr: str, question: str, method: str = "sbs", parameters: dict | None = None,
                 timeout_s: float | None = 600.0, **kw) -> Iterator[search_pb2.SolveEvent]:
    channel, stub = search_stub(addr)
    with channel:
        yield from stub.SolveStream(solve_request(question, method, parameters, **kw), timeout=timeout_s)


def format_response(resp: search_pb2.SolveResponse, question: str | None = None,
                    ground_truth: str | None = None) -> str:
    """A readable solution: the steps (with code output), the answer, its value and the timing."""
    lines = [f"Question: {question}"] if question else []
    for i, s in enumerate(resp.steps, 1):
        value = f"  [value {s.value:+.2f}]" if s.HasField("value") else ""
        lines.append(f"  step {i} ({s.kind}){value}: {s.text.strip()}")
        if s.HasField("code"):
            lines.append("    code: " + s.code.strip().replace("\n", "\n          "))
        if s.HasField("output"):
            lines.append("    output: " + (s.output.strip() or "(nothing)").replace("\n", "\n            "))
    answer = resp.answer if resp.HasField("answer") else "(no answer)"
    value = f"{resp.value:+.3f}" if resp.HasField("value") else "n/a"
    tail = f"Answer: {answer}   value: {value}   ({resp.method}, {resp.tree.nodes - 1} steps explored, " \
           f"{resp.duration_s:.1f} s, checkpoint {resp.checkpoint or '?'}, sandbox {resp.sandbox_backend or '?'})"
    lines.append(tail)
    if ground_truth is not None or resp.HasField("correct"):
        lines.append(f"Ground truth: {ground_truth if ground_truth is not None else '?'}   "
                     f"correct: {resp.correct if resp.HasField('correct') else None}")
    return "\n".join(lines)


def health(addrs: dict[str, str], timeout_s: float = 2.0) -> dict[str, str]:
    """Health status name per service ("SERVING", "NOT_SERVING", or "UNREACHABLE: ...")."""
    out = {}
    for name, addr in addrs.items():
        try:
            with grpc.insecure_channel(addr) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                            timeout=timeout_s)
            out[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        except grpc.RpcError as e:
            out[name] = f"UNREACHABLE: {e.code().name}"
    return out


def _params(a) -> dict:
    return {k: getattr(a, k) for k in PARAM_FLAGS if getattr(a, k) is not None}


def _add_param_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("search parameters (unset: the server's defaults, the paper's values)")
    for name in PARAM_FLAGS:
        kind = float if name in ("c_puct", "temperature", "top_p") else str if name == "select_by" else int
        kw = {"choices": SELECT_BY} if name == "select_by" else {}
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, **kw)


def cmd_solve(a) -> int:
    kw = dict(ground_truth=a.ground_truth, include_tree=a.json)
    if a.stream:
        result = None
        for ev in solve_stream(a.addr, a.question, a.method, _params(a), a.timeout, **kw):
            if ev.WhichOneof("event") == "progress":
                p = ev.progress
                best = p.best_answer if p.HasField("best_answer") else "-"
                print(f"  progress {p.iterations_done}/{p.iterations_total}  nodes {p.nodes}  best {best}"
                      f"  {p.elapsed_s:.1f}s", file=sys.stderr)
            else:
                result = ev.result
        resp = result
    else:
        resp = solve(a.addr, a.question, a.method, _params(a), a.timeout, **kw)
    if a.json:
        from google.protobuf.json_format import MessageToDict
        print(json.dumps(MessageToDict(resp), indent=2, ensure_ascii=False))
    else:
        print(format_response(resp, a.question, a.ground_truth))
    return 0


def cmd_generate(a) -> int:
    from alphamath.data import load_problems

    problems = load_problems(a.data, a.limit)
    req = search_pb2.GenerateTreesRequest(
        questions=[search_pb2.Question(id=p.id, question=p.question, ground_truth=p.answer) for p in problems],
        parameters=parameters_to_pb(_params(a)), concurrency=a.concurrency)
    channel, stub = search_stub(a.addr)
    failed = 0
    with channel:
        for r in stub.GenerateTrees(req, timeout=a.timeout):
            if r.HasField("error"):
                failed += 1
            res = r.result
            answer = res.answer if res.HasField("answer") else None
            print(json.dumps({"question_id": r.question_id, "answer": answer,
                              "correct": res.correct if res.HasField("correct") else None,
                              "nodes": res.tree.nodes, "published": r.published,
                              "error": r.error if r.HasField("error") else None}))
    return 1 if failed else 0


def cmd_health(a) -> int:
    addrs = {name: f"{a.host}:{port}" for name, port in GRPC_PORTS.items() if name in a.services}
    status = health(addrs)
    for name, s in status.items():
        print(f"{name:8s} {addrs[name]:22s} {s}")
    return 0 if all(s == "SERVING" for s in status.values()) else 1


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="alphamath client", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    addr = os.environ.get("ALPHAMATH_SEARCH_ADDR", DEFAULT_SEARCH_ADDR)

    s = sub.add_parser("solve", help="solve one question")
    s.add_argument("question")
    s.add_argument("--method", default="sbs", choices=METHODS)
    s.add_argument("--ground-truth", default=None, help="report whether the answer is correct")
    s.add_argument("--stream", action="store_true", help="print progress events (SolveStream)")
    s.add_argument("--json", action="store_true", help="print the response (with the tree) as JSON")
    s.add_argument("--addr", default=addr, help="SearchService address [env ALPHAMATH_SEARCH_ADDR]")
    s.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds")
    _add_param_flags(s)
    s.set_defaults(fn=cmd_solve)

    g = sub.add_parser("generate", help="GenerateTrees (MCTS with ground truth) over a JSONL file")
    g.add_argument("--data", required=True, help='JSONL of {"id", "question", "answer"}')
    g.add_argument("--limit", type=int, default=None)
    g.add_argument("--concurrency", type=int, default=0, help="questions at once (0: server default)")
    g.add_argument("--addr", default=addr, help="SearchService address [env ALPHAMATH_SEARCH_ADDR]")
    g.add_argument("--timeout", type=float, default=3600.0)
    _add_param_flags(g)
    g.set_defaults(fn=cmd_generate)

    h = sub.add_parser("health", help="gRPC health of the services on their standard ports")
    h.add_argument("--host", default="127.0.0.1")
    h.add_argument("--services", nargs="+", default=["policy", "value", "sandbox", "search"],
                   choices=sorted(GRPC_PORTS))
    h.set_defaults(fn=cmd_health)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        return a.fn(a)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except ValueError as e:  # bad local input (data file, parameters)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
