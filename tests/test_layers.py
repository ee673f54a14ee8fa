"""The package's layering: the plugin every SGLang process loads stays cheap, and no module imports
one that imports it back (at the top or inside a function)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sgl_merge"


def test_the_plugin_loads_no_frontend_and_no_sglang_lang():
    code = ("import sys; import sgl_merge.runtime.plugin as p; p.hook_table(); "
            "print(sorted(m for m in sys.modules if m.startswith(('sglang.lang', 'sgl_merge.frontend', "
            "'sgl_merge.evaluation', 'sgl_merge.testing'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every sgl_merge module and the sgl_merge modules it imports anywhere in its file."""
    files = {_module_name(f): f for f in PACKAGE.rglob("*.py") if "stand_in" not in f.parts}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("sgl_merge"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in files else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("sgl_merge"))
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_import_cycles():
    graph, cycles, done = _imports(), [], set()

    def visit(module, path):
        if module in path:
            cycles.append(" -> ".join(path[path.index(module):] + [module]))
            return
        if module not in done:
            for dep in sorted(graph[module]):
                visit(dep, path + [module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, cycles


def _package(module: str) -> str:
    """`sgl_merge.runtime.join` -> `sgl_merge.runtime`; a top-level module is its own package."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_the_contract_is_the_bottom_layer():
    """`sgl_merge.contract` imports no other sgl_merge module: the runtime, serving, frontend and
    evaluation import down into it, never the other way."""
    graph = _imports()
    up = {m: sorted(d for d in deps if not d.startswith("sgl_merge.contract"))
          for m, deps in graph.items() if m.startswith("sgl_merge.contract")}
    assert up and not any(up.values()), up


def test_the_contract_imports_neither_torch_nor_sglang():
    code = ("import sys, pkgutil, importlib, sgl_merge.contract as c\n"
            "for m in pkgutil.iter_modules(c.__path__): importlib.import_module(f'sgl_merge.contract.{m.name}')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sglang') or "
            "(m.startswith('sgl_merge.') and not m.startswith('sgl_merge.contract'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_no_private_name_crosses_a_package():
    """A name starting with `_` is imported only inside its own package (the contract's helpers
    stay the contract's)."""
    files = {_module_name(f): f for f in PACKAGE.rglob("*.py") if "stand_in" not in f.parts}
    crossing = []
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("sgl_merge."):
                crossing += [f"{name} imports {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and _package(node.module) != _package(name)]
    assert not crossing, crossing
