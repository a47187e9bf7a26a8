"""pml never imports torch or transformers, and library code never prints."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PML = Path(__file__).resolve().parents[2] / "pml"


def test_importing_pml_loads_no_model_libraries():
    code = (
        "import pml, pml.parser, pml.layout, pml.prompt, pml.builder, pml.cli, pml.model, pml.errors, pml.limits, pml.compat; import sys; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith(('torch', 'transformers')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PML.parent)
    assert r.returncode == 0, r.stderr


def test_library_code_never_prints():
    # Command-line entry points print; that is their job: cli.py, and compat.run (pml import-authors).
    allowed = {"compat.py": {"run"}}
    for f in PML.glob("*.py"):
        if f.name == "cli.py":
            continue
        tree = ast.parse(f.read_text())
        inside = {
            id(n)
            for fn in ast.walk(tree)
            if isinstance(fn, ast.FunctionDef) and fn.name in allowed.get(f.name, ())
            for n in ast.walk(fn)
        }
        calls = [
            n for n in ast.walk(tree)
            if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print" and id(n) not in inside
        ]
        assert not calls, f"{f.name} prints; use logging"
