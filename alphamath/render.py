"""Human views of a tree: indented text for the terminal, one self-contained HTML page."""
from __future__ import annotations

import html
import json

from alphamath.tree import Node, Tree


def _label(n: Node) -> str:
    bits = [f"#{n.id}", f"N={n.N}", f"Q={n.Q:+.3f}", f"P={n.prior:.3f}"]
    if n.value is not None:
        bits.append(f"V={n.value:+.3f}")
    if n.terminal_reason:
        bits.append(f"[{n.terminal_reason}]")
    if n.answer is not None:
        bits.append(f"answer={n.answer!r}" + ({True: " ✓", False: " ✗"}.get(n.correct, "")))
    return " ".join(bits)


def _oneline(s: str | None, width: int = 100) -> str:
    s = " ".join((s or "").split())
    return s if len(s) <= width else s[: width - 1] + "…"


def tree_text(tree: Tree) -> str:
    lines = [f"Q: {tree.question}", f"ground truth: {tree.ground_truth}   answer: {tree.meta.get('answer')}"
             f"   correct: {tree.meta.get('correct')}", _label(tree.root)]

    def walk(node_id: int, indent: str):
        kids = tree.nodes[node_id].children
        for i, c in enumerate(kids):
            n = tree.nodes[c]
            last = i == len(kids) - 1
            lines.append(f"{indent}{'└─' if last else '├─'} {_label(n)}")
            sub = indent + ("   " if last else "│  ")
            lines.append(f"{sub}  {_oneline(n.text)}")
            if n.code:
                lines.append(f"{sub}  code: {_oneline(n.code)}  → {_oneline(n.output, 60)}")
            walk(c, sub)

    walk(0, "")
    return "\n".join(lines)


def solution_text(tree: Tree, node_id: int | None) -> str:
    """The steps of one path, with code and outputs, for printing an answer."""
    if node_id is None:
        return "(no solution found)"
    out = []
    for i, n in enumerate(tree.path(node_id), 1):
        v = f" (value {n.value:+.3f})" if n.value is not None else ""
        out.append(f"Step {i}{v}: {n.text.strip()}")
        if n.code:
            out.append("  ```python\n  " + n.code.replace("\n", "\n  ") + "\n  ```")
            out.append(f"  output: {(n.output or '').strip()}")
    return "\n".join(out)


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>alphamath tree {qid}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em}} details{{margin-left:1.2em;border-left:1px solid #ccc;
padding-left:.6em}} summary{{cursor:pointer}} .ok{{color:#070}} .bad{{color:#b00}} pre{{background:#f6f6f6;
padding:.4em;white-space:pre-wrap}} .meta{{color:#555;font-size:12px}}</style></head><body>
<h2>{question}</h2><p>ground truth: <b>{gt}</b> — answer: <b>{answer}</b> — correct: {correct}</p>
{body}<script type="application/json" id="tree">{data}</script></body></html>"""


def tree_html(tree: Tree) -> str:
    def node_html(n: Node) -> str:
        cls = {True: "ok", False: "bad"}.get(n.correct, "")
        body = f"<pre>{html.escape(n.text)}</pre>" if n.text else ""
        if n.code:
            body += f"<pre>{html.escape(n.code)}</pre><pre>→ {html.escape(n.output or '')}</pre>"
        kids = "".join(node_html(tree.nodes[c]) for c in n.children)
        return (f"<details open><summary class='{cls}'>{html.escape(_label(n))}</summary>"
                f"{body}{kids}</details>")

    data = tree.to_json().replace("</", "<\\/")  # raw JSON; only "</" could end the script
    return _PAGE.format(qid=html.escape(str(tree.question_id)), question=html.escape(tree.question),
                        gt=html.escape(str(tree.ground_truth)), answer=html.escape(str(tree.meta.get("answer"))),
                        correct=tree.meta.get("correct"), body=node_html(tree.root), data=data)


def tree_json_pretty(tree: Tree) -> str:
    return json.dumps(tree.to_dict(), indent=2, ensure_ascii=False)
