"""The packages depend one way along the pipeline (docs/DESIGN.md), with no import cycles.

Every `import` statement counts, including the ones inside functions (those hide a dependency but
do not remove it). Tests are not checked: they may use anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Lowest first: a package may import itself and the packages before it, never one after it.
ORDER = ["pml", "attention_store", "prompt_cache", "serving", "experiments", "paper_repro", "pml_cli"]


def package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the project's packages."""
    out = {}
    for pkg in ORDER:
        for f in sorted((ROOT / pkg).rglob("*.py")) if (ROOT / pkg).is_dir() else []:
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that `name` imports (resolved to the longest known dotted prefix)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import sub` depends on the submodule; the package itself only when a name
            # is not a submodule (a package's __init__ running first is not a dependency cycle).
            subs = [f"{base}.{a.name}" for a in node.names]
            targets = subs + ([base] if any(t not in known for t in subs) else [])
        for t in targets:
            parts = t.split(".")
            for i in range(len(parts), 0, -1):
                if ".".join(parts[:i]) in known:
                    found.add(".".join(parts[:i]))
                    break
    found.discard(name)
    return found


GRAPH = {}


def graph() -> dict[str, set[str]]:
    if not GRAPH:
        mods = package_modules()
        GRAPH.update({m: imports_of(m, f, set(mods)) for m, f in mods.items()})
    return GRAPH


def layer(module: str) -> int:
    return ORDER.index(module.split(".")[0])


def test_the_walker_sees_imports():
    # Guard against a test that cannot fail: known edges are found, lazy imports included.
    g = graph()
    assert "attention_store.adapter" in g["attention_store.encoder"]
    assert "prompt_cache.models" in g["prompt_cache.engine"]  # imported inside PromptCache.load
    assert "pml.parser" in g["pml_cli.engine_commands"]


def test_no_import_runs_up_the_pipeline():
    bad = sorted(f"{m} imports {t}" for m, targets in graph().items() for t in targets if layer(t) > layer(m))
    assert not bad, "imports against the pipeline direction (docs/DESIGN.md):\n" + "\n".join(bad)


def test_no_import_cycles():
    g, state, cycles = graph(), {}, []

    def visit(node, stack):
        state[node] = "active"
        for nxt in sorted(g[node]):
            if state.get(nxt) == "active":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    # A package's __init__ importing its own submodules (to register them) is not a cycle worth
    # breaking unless a submodule imports the package back by name: that is what this catches.
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("pkg", ["pml", "attention_store", "prompt_cache"])
def test_lower_packages_exist(pkg):
    assert (ROOT / pkg / "__init__.py").is_file()
