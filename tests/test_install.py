"""A non-editable install is a real package: ``netcompress.*`` imports from anywhere, no generic
top-level module (``compression``, ``callbacks``, ...) lands in site-packages, the configs ship
inside it, and the ``netcompress`` command composes a run."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import scratch_copy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel of this working tree (--no-deps); the current environment's
    packages (torch, Lightning, ...) are visible through a .pth path line, whose own .pth files
    (this checkout's editable install among them) are not executed."""
    root = tmp_path_factory.mktemp("install")
    source = scratch_copy(root / "src")
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(source)], check=True, capture_output=True, timeout=300)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (wheel,) = wheels.glob("netcompress-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return venv


def run_in(venv: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**env, "WANDB_MODE": "offline"})


def test_wheel_imports_as_netcompress_from_anywhere(installed, tmp_path):
    python = str(installed / "bin" / "python")
    proc = run_in(installed, [python, "-c", "import netcompress, netcompress.callbacks, netcompress.compression; "
                              "print(netcompress.__file__)"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith(str(installed))  # the wheel's copy, not this checkout
    for generic in ("compression", "callbacks", "models", "run", "report", "pipeline"):
        missing = run_in(installed, [python, "-c", f"import {generic}"], cwd=tmp_path)
        assert missing.returncode != 0 and "No module named" in missing.stderr, generic


def test_installed_command_composes_the_packaged_config(installed, tmp_path):
    command = installed / "bin" / "netcompress"
    python = str(installed / "bin" / "python")
    # the console script of a --target install is not placed in bin/: call its entry point the same way
    entry = [str(command)] if command.exists() else [python, "-c", "from netcompress.run import cli; cli()"]
    proc = run_in(installed, [*entry, "data=synthetic", "compression=[slimming]", "--cfg", "job"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "_target_: netcompress.callbacks.slimming.Slimming" in proc.stdout
    bad = run_in(installed, [*entry, "compression=[slimmming]"], cwd=tmp_path)
    assert bad.returncode == 2 and "slimming" in bad.stderr  # the pre-flight finds the packaged conf/ too
