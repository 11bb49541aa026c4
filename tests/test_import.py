"""Importing refnorm needs numpy only (no numba, CuPy, MPI, Jupyter or plotting), and the
package's imports go down its floors, never up and never in a circle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import refnorm
from refnorm.backend import array_namespace, to_numpy


def test_import_pulls_in_no_optional_dependency():
    code = (
        "import sys, refnorm, refnorm.gradcheck, refnorm.cli\n"
        "heavy = {'cupy', 'mpi4py', 'IPython', 'jupyter_client', 'matplotlib', 'numba',"
        " 'array_api_strict', 'hypothesis'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_every_public_submodule_is_an_attribute_in_a_fresh_process():
    """``refnorm.dispatch.set_path("fast")`` as the README writes it, first thing in a script
    (it raised AttributeError until something had imported refnorm.dispatch)."""
    names = sorted(p.stem if p.suffix else p.name for p in Path(refnorm.__file__).parent.iterdir()
                   if not p.name.startswith("_") and (p.suffix == ".py" or (p / "__init__.py")
                                                      .exists()))
    assert {"dispatch", "backend", "layer", "registry", "testing", "train"} <= set(names)
    code = ("import sys, refnorm\n"
            f"for name in {names!r}:\n"
            "    assert getattr(refnorm, name) is sys.modules['refnorm.' + name], name\n"
            "refnorm.dispatch.set_path('fast')\n"
            "print(refnorm.dispatch.get_path())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "fast"
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        refnorm.no_such_name  # noqa: B018


def test_array_namespace():
    import numpy as np

    assert array_namespace(np.ones(2), None, np.zeros(1)) is np
    with pytest.raises(TypeError, match="expected an array"):
        array_namespace([1.0])
    with pytest.raises(TypeError, match="at least one array"):
        array_namespace(None)


def test_to_numpy_from_array_api_strict():
    strict = pytest.importorskip("array_api_strict")
    import numpy as np

    a = strict.asarray([[1.0, 2.0]])
    np.testing.assert_array_equal(to_numpy(a), [[1.0, 2.0]])


# -- the floors of the house: no module imports one above its own, and no circle ---------------

ROOT = Path(refnorm.__file__).resolve().parent

# Bottom to top. A module belongs to the floor of the longest prefix that names it; the
# package ``refnorm`` itself (its __init__, which re-exports the public API) sits with the
# network-level tools it imports. Within a floor any import is allowed, as long as there is
# no circle.
FLOORS = (
    ("refnorm.backend", "refnorm.core", "refnorm.launch", "refnorm.argtypes"),
    ("refnorm.kernels", "refnorm.dispatch"),
    ("refnorm.layer",),
    ("refnorm.norms", "refnorm.nn", "refnorm.weights", "refnorm.sync", "refnorm.registry"),
    ("refnorm.inference", "refnorm.gradcheck", "refnorm.errata", "refnorm"),
    ("refnorm.train",),
    ("refnorm.testing",),
    ("refnorm.cli", "refnorm.__main__", "refnorm.bench", "refnorm.bench_cases",
     "refnorm.bench_gpu", "refnorm.bench_parallel", "refnorm.lessons"),
)


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = ("refnorm",) + path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The refnorm modules ``name`` imports anywhere in its file (functions included):
    ``from a import b`` counts as importing ``a.b`` when that is a module, else ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in out if m in modules and m != name}


def _floor(name: str) -> int:
    best = max((len(prefix), i) for i, floor in enumerate(FLOORS) for prefix in floor
               if name == prefix or name.startswith(prefix + "."))
    return best[1]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_floor():
    for name in _graph():
        _floor(name)  # raises ValueError (max of nothing) for a module on no floor


def test_no_module_imports_one_on_a_higher_floor():
    upward = sorted(f"{a} (floor {_floor(a)}) imports {b} (floor {_floor(b)})"
                    for a, targets in _graph().items() for b in targets
                    if _floor(b) > _floor(a))
    assert upward == []


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_circle_finder_finds_a_circle():
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_circle():
    assert _circle(_graph()) is None



def test_the_dispatcher_imports_no_module_by_string():
    source = (ROOT / "dispatch.py").read_text()
    assert "importlib" not in source and "__import__" not in source
