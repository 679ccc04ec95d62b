"""The code's direction: serving never loads build code, and no two modules import each other.

A serving process starts from a bundle; the build side (model.yaml, tracing, exporting, the
bucket planner, the build cache) is not needed there, and importing it would put its bugs and
start-up cost on every replica. Cycles are checked over every import, also those inside
functions: an in-function import that dodges a cycle is still a cycle.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import aotlm

PACKAGE = Path(aotlm.__file__).parent
SERVING = (
    "aotlm.runtime.http.server",
    "aotlm.runtime.generation.engine",
    "aotlm.runtime.generation.async_engine",
    "aotlm.runtime.embedding.embedder",
    "aotlm.runtime.embedding.async_embedder",
    "aotlm.runtime.load.loader",
)
BUILD_SIDE = ("aotlm.build",)  # model.yaml, tracing, exporting, compiling, the build cache


def test_serving_imports_no_build_code():
    code = (
        "import importlib, json, sys\n"
        f"for m in {SERVING!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('aotlm'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = json.loads(out.splitlines()[-1])
    assert "aotlm.runtime.load.loader" in loaded  # the check ran what it names
    leaked = [m for m in loaded if any(m == b or m.startswith(b + ".") for b in BUILD_SIDE)]
    assert leaked == []


def _module_graph(external: bool = False) -> dict[str, set[str]]:
    """Module -> the aotlm modules it imports (with `external`: also the top-level packages)."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                names = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            graph[module] |= {n for n in names if n in files and n != module}
            if external:
                graph[module] |= {n.split(".")[0] for n in names if not n.startswith("aotlm")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = _module_graph()
    assert "aotlm.runtime.load.loader" in graph["aotlm.runtime.generation.engine"]
    assert _cycles(graph) == []


def test_only_the_cli_imports_click():
    importers = {m for m, deps in _module_graph(external=True).items() if "click" in deps}
    assert "aotlm.cli.options" in importers  # the check sees third-party imports
    assert sorted(m for m in importers if not m.startswith("aotlm.cli")) == []
