"""The house is one-way (issue 15), checked from the source: every import, including the ones made
inside functions, is an edge.

    app (the Face)  ->  services (policy_svc, value_svc, search_svc, sandbox_svc, trainer_svc)  ->  alphamath

  * the library imports no service and not the Face;
  * no service imports another service, except the trainer using search's engine entry point
    (`search_svc.engine`) to generate trees and run the gate in-process;
  * nobody imports another package's private (`_name`) names;
  * nothing imports the Face;
  * there are no import cycles between modules.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY, FACE = "alphamath", "app"
SERVICES = ("policy_svc", "value_svc", "search_svc", "sandbox_svc", "trainer_svc")
PACKAGES = (LIBRARY, FACE, *SERVICES)
ALLOWED_BETWEEN_SERVICES = {("trainer_svc", "search_svc.engine")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "pb" in path.relative_to(ROOT).parts[1:2]:  # generated protobuf code
                continue
            out[module_name(path)] = path
    return out


def imports(path: Path, name: str, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import statement of a file."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_pkg else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in known:  # `from pkg import module`
                    out.append((sub, [], node.lineno))
                else:
                    out.append((base, [a.name], node.lineno))
    return [(m, names, line) for m, names, line in out if m.split(".")[0] in PACKAGES]


def resolve(mod: str, known: set[str]) -> str:
    """The module file an import lands in (`a.b.c` may name a package `a.b` attribute)."""
    while mod and mod not in known:
        mod = mod.rpartition(".")[0]
    return mod


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    known = set(mods)
    return {name: [(resolve(m, known), m, names, line) for m, names, line in imports(path, name, known)]
            for name, path in mods.items()}


def test_every_package_is_found(graph):
    tops = {m.split(".")[0] for m in graph}
    assert tops == set(PACKAGES), tops


def test_library_imports_no_service_and_not_the_face(graph):
    bad = [f"{src}:{line} imports {raw}" for src, edges in graph.items() if src.split(".")[0] == LIBRARY
           for _, raw, _, line in edges if raw.split(".")[0] != LIBRARY]
    assert not bad, "\n".join(bad)


def test_no_service_imports_another_service(graph):
    bad = []
    for src, edges in graph.items():
        top = src.split(".")[0]
        if top not in SERVICES:
            continue
        for dst, raw, _, line in edges:
            other = dst.split(".")[0]
            if other in SERVICES and other != top and (top, dst) not in ALLOWED_BETWEEN_SERVICES:
                bad.append(f"{src}:{line} imports {raw}")
            if other == FACE:
                bad.append(f"{src}:{line} imports the Face ({raw})")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_packages(graph):
    bad = [f"{src}:{line} takes {n} from {raw}" for src, edges in graph.items() for dst, raw, names, line in edges
           if dst.split(".")[0] != src.split(".")[0] for n in names if n.startswith("_")]
    assert not bad, "\n".join(bad)


def test_no_import_cycles(graph):
    """Tarjan's strongly connected components over module -> module edges; any component of more
    than one module (or a module importing itself) is a cycle."""
    adj = {m: sorted({d for d, *_ in edges if d in graph and d != m}) for m, edges in graph.items()}
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for m in adj:
        if m not in index:
            visit(m)
    assert not comps, "import cycles: " + "; ".join(" <-> ".join(c) for c in comps)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The rules above are not vacuous: a library module that imports a service is reported."""
    lib = tmp_path / LIBRARY
    lib.mkdir()
    (lib / "__init__.py").write_text("")
    (lib / "bad.py").write_text("def f():\n    from policy_svc.server import PolicyServer\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    found = imports(lib / "bad.py", "alphamath.bad", {"alphamath", "alphamath.bad"})
    assert found == [("policy_svc.server", ["PolicyServer"], 2)]
