"""The package's layering, read from the source with ``ast``: every ``import`` (module level and inside functions)
of every module of ``internvl_kernels`` and ``quantize``.

* nothing under ``internvl_kernels`` imports ``quantize`` (the runtime never loads the quantizers);
* the dependency graph (an edge per import, to the module named; ``from pkg import sub`` is an edge to ``pkg.sub``
  when ``sub`` is a submodule) has no cycle;
* the import-time graph (module-level imports only; importing ``a.b.c`` also runs ``a/__init__`` and
  ``a/b/__init__``) has no cycle, so no module ever sees a partially initialized one;
* in a fresh interpreter, importing the runtime packages leaves no ``quantize*`` module in ``sys.modules``.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("internvl_kernels", "quantize")
EXTENSIONS = {"internvl_kernels._C"}  # compiled (csrc/): a leaf, imports nothing of ours


def _modules() -> dict[str, str]:
    """module name → file path for every .py under the packages."""
    out = {}
    for pkg in PACKAGES:
        for dirpath, dirnames, files in os.walk(os.path.join(ROOT, pkg)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, "").endswith("__init__.py")


def _resolve_relative(module: str, level: int, target: str | None) -> str:
    base = module if _is_package(module) else module.rpartition(".")[0]
    for _ in range(level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{target}" if target else base


def _imports(name: str) -> list[tuple[str, bool]]:
    """``(imported module, at module level)`` for every import statement of module ``name`` (local modules only).

    ``importlib.import_module("<literal>")`` calls count as imports too, and so do the module paths named in a
    module-level dict of a module that calls ``lazy_exports`` (lazy package attributes,
    :mod:`internvl_kernels.lazy_exports`); both are imports at first use, not at import time."""
    tree = ast.parse(open(MODULES[name], encoding="utf-8").read(), MODULES[name])
    top_level = {id(n) for n in tree.body}
    for n in tree.body:  # imports under a module-level if/try still run at import time
        if isinstance(n, (ast.If, ast.Try)):
            top_level |= {id(c) for c in ast.walk(n)}
    found = []
    for node in ast.walk(tree):
        at_top = id(node) in top_level
        if isinstance(node, ast.Import):
            found += [(a.name, at_top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve_relative(name, node.level, node.module) if node.level else node.module
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.append((sub if sub in MODULES or sub in EXTENSIONS else mod, at_top))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.append((node.args[0].value, False))
    if any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "lazy_exports" for n in ast.walk(tree)):
        for n in tree.body:
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict):
                for c in list(n.value.keys) + list(n.value.values):
                    if isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value.split(".")[0] in PACKAGES:
                        found.append((c.value, False))
    return [(m, top) for m, top in found if m.split(".")[0] in PACKAGES and m not in EXTENSIONS]


def _parents(mod: str) -> list[str]:
    parts = mod.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def test_every_module_parses_and_imports_resolve():
    assert "internvl_kernels.quant.formats" in MODULES and "quantize.cli" in MODULES
    unknown = {(name, m) for name in MODULES for m, _ in _imports(name) if m not in MODULES}
    assert not unknown, f"imports of modules that do not exist: {sorted(unknown)}"


def test_runtime_never_imports_quantize():
    bad = [(name, m) for name in MODULES if name.startswith("internvl_kernels")
           for m, _ in _imports(name) if m.split(".")[0] == "quantize"]
    assert not bad, f"internvl_kernels modules importing quantize: {bad}"


def test_dependency_graph_has_no_cycle():
    graph = {name: {m for m, _ in _imports(name) if m != name} for name in MODULES}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_import_time_graph_has_no_cycle():
    graph = {}
    for name in MODULES:
        edges = set()
        for m, top in _imports(name):
            if top:
                edges.update(p for p in _parents(m) if p in MODULES)
        # a module's own package __init__ runs before it, so it is no edge of the module itself
        graph[name] = edges - set(_parents(name))
    cycle = _find_cycle(graph)
    assert cycle is None, "import-time cycle: " + " -> ".join(cycle)


def test_lazy_package_attributes_are_seen():
    lazy = {m for m, top in _imports("internvl_kernels.model") if not top}
    assert {"internvl_kernels.model.chat", "internvl_kernels.model.quantized"} <= lazy
    assert not any(top for m, top in _imports("internvl_kernels.model") if m.startswith("internvl_kernels.model."))


def test_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("stmt", [
    "import internvl_kernels, internvl_kernels.quant, internvl_kernels.model",
    "import internvl_kernels.ops, internvl_kernels.quant.formats, internvl_kernels.checkpoint",
    "from internvl_kernels.quant import QuantLinear, apply_quantization; "
    "from internvl_kernels.model import InternVLChatModel, load_quantized_llm",
])
def test_importing_the_runtime_loads_no_quantizer(stmt):
    code = f"import sys; {stmt}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'quantize'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "INTERNVL_KERNELS_NO_CUDA": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
