"""No import circle between edge-recover's modules, function-local imports included (docs/design.md: a local
import that hides a cycle is the sign that something lives in the wrong module).

Every import statement of every module (recovery/modes/ too) is read with `ast`, as test_import_layers.py reads
them; the strongly connected components of that graph must all be single modules.
"""

from __future__ import annotations

from pathlib import Path

from tests.sdk.test_import_layers import ROOT, STAGES


def _modules() -> dict[str, tuple[Path, str]]:
    out = {}
    for folder in STAGES:
        base = "edge_recover" if folder == "sdk" else f"edge_recover.{folder}"
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((base, *parts))
            out[name.removesuffix(".__init__")] = (path, folder)
    return out


def _imports_of(path: Path, package: str) -> list[str]:
    """The absolute module names `path` imports (every statement, function-local ones too); `package` is the
    module's own package, which relative imports start from (a sub-package such as recovery/modes too)."""
    import ast

    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = node.module or "" if node.level == 0 else ".".join(
                parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            out.append(base)
            out += [f"{base}.{alias.name}" for alias in node.names]  # `from . import x`: x may be a module
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, (path, _) in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for target in _imports_of(path, package):
            if not target.startswith("edge_recover"):
                continue
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name and target != package:  # a module's own package: its __init__
                deps.add(target)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_circles():
    graph = _graph()
    assert len(graph) > 60 and "edge_recover.recovery.modes.qat" in graph
    assert _cycles(graph) == []


def test_the_checker_sees_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
