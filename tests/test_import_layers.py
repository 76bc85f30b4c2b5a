"""Imports run one way: the import-linter layers contract in pyproject.toml ([tool.importlinter]) holds.

``import-linter`` is in the ``test`` extra, so CI (which runs ``python -m pytest -q``) enforces the contract."""

import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _lint_imports() -> str:
    exe = shutil.which("lint-imports") or str(pathlib.Path(sys.executable).with_name("lint-imports"))
    return exe


def test_layers_contract_is_kept():
    r = subprocess.run([_lint_imports()], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "1 kept, 0 broken" in r.stdout


def test_the_contract_catches_an_upward_import(tmp_path):
    """A copy of the package with one upward import (estimators → nn) breaks the contract."""
    pkg = tmp_path / "src" / "normmatters"
    shutil.copytree(ROOT / "src" / "normmatters", pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    base = pkg / "estimators" / "base.py"
    base.write_text(base.read_text() + "\nfrom ..nn import batchnorm  # noqa\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    env = {"PYTHONPATH": str(tmp_path / "src"), "PATH": str(pathlib.Path(sys.executable).parent)}
    r = subprocess.run([_lint_imports()], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode != 0
    assert "normmatters.estimators is not allowed to import normmatters.nn" in r.stdout
