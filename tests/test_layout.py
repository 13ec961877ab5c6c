"""The package's shape, as the README's "How it fits together" describes it.

Imports form a tree (no cycle, and no import inside a function to dodge
one), modules and classes stay small, and the CUDA emulation switch is read
inside the CUDA backend only. Read from the installed package's sources.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Set

import fusedoptim

PACKAGE = pathlib.Path(fusedoptim.__file__).parent
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 250


def _modules() -> Dict[str, pathlib.Path]:
    """Module name -> source, for the package outside the benchmark package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        if rel.parts[0] == "bench":
            continue
        parts = ("fusedoptim",) + rel.parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> List[str]:
    """The package modules an ``import from`` names."""
    if node.level:
        base = module.split(".")
        if not is_package:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{a.name}" for a in node.names]


def _graph() -> Dict[str, Set[str]]:
    mods = _modules()
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(name, path.name == "__init__.py", node)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def test_imports_form_a_tree():
    graph = _graph()
    assert "fusedoptim.optimizer" in graph and "fusedoptim.backends.cuda" in graph, sorted(graph)
    state: Dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: List[str]) -> None:
        state[m] = 1
        for dep in sorted(graph[m]):
            # A package's __init__ is imported by its submodules' imports; that edge is no cycle.
            if m.startswith(dep + "."):
                continue
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [m, dep]))
            if dep not in state:
                visit(dep, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_no_package_import_inside_a_function():
    for name, path in _modules().items():
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom):
                        assert not (node.level or (node.module or "").startswith("fusedoptim")), \
                            f"{name}.{fn.name} imports {node.module!r} at run time"


def test_modules_and_classes_are_small():
    for name, path in _modules().items():
        source = path.read_text()
        assert source.count("\n") <= MAX_MODULE_LINES, f"{name}: {source.count(chr(10))} lines"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                lines = node.end_lineno - node.lineno + 1
                assert lines <= MAX_CLASS_LINES, f"{name}.{node.name}: {lines} lines"


def test_emulation_switch_is_read_in_the_cuda_backend_only():
    for name, path in _modules().items():
        if name == "fusedoptim.backends.cuda":
            continue
        source = path.read_text()
        for word in ("emulating(", "_emulate", "cuda_emulation"):
            assert word not in source, f"{name} reads the CUDA emulation switch ({word})"


def test_the_checks_can_fail(tmp_path):
    """The tree check sees a cycle, and the size check a long class."""
    pkg = tmp_path / "fusedoptim"
    (pkg / "backends").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "backends" / "__init__.py").write_text("")
    (pkg / "backends" / "cuda.py").write_text("")
    (pkg / "optimizer.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("from .optimizer import x\n" + "class Big:\n" + "    x = 1\n" * 300)
    globals()["PACKAGE"] = pkg
    try:
        for check in (test_imports_form_a_tree, test_modules_and_classes_are_small):
            try:
                check()
            except AssertionError:
                continue
            raise AssertionError(f"{check.__name__} passed on a bad package")
    finally:
        globals()["PACKAGE"] = pathlib.Path(fusedoptim.__file__).parent
