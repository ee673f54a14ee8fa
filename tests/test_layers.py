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
