"""python/fusedoptim/_C.pyi against the compiled module: every public name
bound on ``_C``, on its submodules and on its classes is declared in the
stub, and every name the stub declares is bound (a submodule this build
lacks, e.g. ``_C.cuda`` without nvcc, is skipped for that direction only)."""

import ast
import inspect
import pathlib
import types

from fusedoptim import _C

STUB = pathlib.Path(__file__).resolve().parents[1] / "python" / "fusedoptim" / "_C.pyi"
# Attributes every pybind11 class has; not part of our API.
PYBIND_ATTRS = {"__init__", "__doc__", "__module__", "__dict__", "__weakref__", "__new__"}


def _public(name: str) -> bool:
    if name.startswith("__") and name.endswith("__"):
        return name not in PYBIND_ATTRS
    return not name.startswith("_")


def _stub_members(body) -> dict:
    """name -> ast node of the public names a module or class body declares."""
    out = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = node
    return {k: v for k, v in out.items() if _public(k)}


def _stub(text: str):
    tree = ast.parse(text)
    private_classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    return _stub_members(tree.body), private_classes


def _bound_members(obj) -> set:
    if isinstance(obj, types.ModuleType):
        return {n for n in dir(obj) if not n.startswith("_")}  # (a module's dunders are import machinery)
    return {n for n in vars(obj) if _public(n) and not n.startswith("_pybind11")}


def _compare(where: str, bound: set, declared: set, missing_ok: set = frozenset()) -> list:
    errors = [f"{where}{n}: bound by the module, missing from _C.pyi" for n in sorted(bound - declared)]
    errors += [f"{where}{n}: declared in _C.pyi, not bound by the module"
               for n in sorted(declared - bound - set(missing_ok))]
    return errors


def stub_errors(text: str) -> list:
    declared, classes = _stub(text)
    bound = _bound_members(_C)
    # Submodules the stub declares (``name: SomeClass``) that this build lacks.
    absent = {n for n, node in declared.items() if isinstance(node, ast.AnnAssign) and not hasattr(_C, n)}
    errors = _compare("_C.", bound, set(declared), absent)
    for name in sorted(bound & set(declared)):
        obj, node = getattr(_C, name), declared[name]
        if isinstance(obj, types.ModuleType):
            # Declared as ``name: _SomeClass``: the class lists the submodule's functions.
            ann = node.annotation.id if isinstance(node, ast.AnnAssign) and isinstance(node.annotation, ast.Name) else None
            if ann not in classes:
                errors.append(f"_C.{name}: a submodule; _C.pyi must declare it as `{name}: <class in the stub>`")
                continue
            errors += _compare(f"_C.{name}.", _bound_members(obj), set(_stub_members(classes[ann].body)))
        elif inspect.isclass(obj):
            if not isinstance(node, ast.ClassDef):
                errors.append(f"_C.{name}: a class, not declared as one in _C.pyi")
                continue
            errors += _compare(f"_C.{name}.", _bound_members(obj), set(_stub_members(node.body)))
    return errors


def test_stub_matches_module():
    errors = stub_errors(STUB.read_text())
    assert not errors, "_C.pyi and the compiled module disagree:\n  " + "\n  ".join(errors)


def test_stub_check_can_fail():
    """The comparison sees a method renamed in the stub: one name missing, one extra."""
    text = STUB.read_text()
    assert "    def grad_ptrs(self) -> List[int]:" in text
    edited = text.replace("    def grad_ptrs(self) -> List[int]:", "    def grad_ptrs_gone(self) -> List[int]:")
    errors = stub_errors(edited)
    assert any("_C.StepPlan.grad_ptrs: bound by the module" in e for e in errors), errors
    assert any("_C.StepPlan.grad_ptrs_gone: declared in _C.pyi" in e for e in errors), errors

