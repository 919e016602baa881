"""The architecture holds: layers point down, no callback imports another, compression stays plain
torch (import-linter contracts in pyproject.toml), and nothing imports a bare top-level name."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGES = ("callbacks", "compression", "datamodules", "evaluation", "lightning_modules", "models", "pipeline",
            "protocols")


def test_import_linter_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken" in proc.stdout


def _imported_names(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_package_code_imports_only_through_the_netcompress_root():
    """A bare ``import compression`` would load a second copy of a module under another name (and
    clash with the standard library's ``compression`` since Python 3.14)."""
    files = [ROOT / "run.py", ROOT / "report.py"] + [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    bare = [(str(p.relative_to(ROOT)), name) for p in files for name in _imported_names(p)
            if name.split(".")[0] in (*PACKAGES, "run", "report")]
    assert bare == []


def test_no_module_imports_the_entry_points():
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    offenders = [(str(p.relative_to(ROOT)), name) for p in files for name in _imported_names(p)
                 if name in ("netcompress.run", "netcompress.report")]
    assert offenders == []
