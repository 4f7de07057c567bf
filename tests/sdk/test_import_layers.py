"""No module imports from a later stage of the data path (docs/design.md, STYLE.md):

    sdk (edge_recover)  <-  recovery  <-  exporters  <-  runtimes

Every import statement of every module is read with `ast` (function-local ones too: a local import that
hides a cycle is still an import). The one sanctioned way up is the CLI shell's list of parts that it
imports by name (`sdk/cli.py: _PARTS`, through importlib), which this test does not see as an import.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGES = {"sdk": 0, "recovery": 1, "exporters": 2, "runtimes": 3}
PACKAGE_OF = {"edge_recover.recovery": "recovery", "edge_recover.exporters": "exporters",
              "edge_recover.runtimes": "runtimes"}


def _stage_of_import(name: str) -> str | None:
    """The stage folder an absolute module name lives in (None: not edge-recover)."""
    if name != "edge_recover" and not name.startswith("edge_recover."):
        return None
    for prefix, folder in PACKAGE_OF.items():
        if name == prefix or name.startswith(prefix + "."):
            return folder
    return "sdk"


def _imports(path: Path, folder: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    base = "edge_recover" if folder == "sdk" else f"edge_recover.{folder}"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.append((node.lineno, node.module or ""))
            else:
                parent = base.split(".")[: len(base.split(".")) - (node.level - 1)]
                module = ".".join(parent + ([node.module] if node.module else []))
                out.append((node.lineno, module))
                if not node.module:  # `from . import x`: x may be a module of that package
                    out += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return out


def test_no_module_imports_a_later_stage():
    violations = []
    checked = 0
    for folder, stage in STAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            checked += 1
            for line, name in _imports(path, folder):
                target = _stage_of_import(name)
                if target is not None and STAGES[target] > stage:
                    violations.append(f"{folder}/{path.name}:{line} imports {name} ({target} comes after {folder})")
    assert checked > 40
    assert not violations, "\n".join(violations)


def test_the_checker_sees_a_violation(tmp_path):
    """The parser resolves relative and function-local imports (else the test above proves nothing)."""
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from edge_recover.exporters.lora import file_sha256\n    from ..exporters import api\n"
                 "    from . import session\n")
    names = [n for _, n in _imports(p, "runtimes")]
    assert names[:2] == ["edge_recover.exporters.lora", "edge_recover.exporters"]
    assert names[2:] == ["edge_recover.runtimes", "edge_recover.runtimes.session"]
    assert [_stage_of_import(n) for n in names] == ["exporters", "exporters", "runtimes", "runtimes"]
