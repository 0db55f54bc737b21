"""A non-editable install (``pip install .``) works on its own: the shipped cost models are package
data, found without ``MULAYER_DATA_DIR`` or a checkout.

The project is installed into a fresh virtual environment (no pip of its own, nothing installed)
from a copy of its packaged folders, so neither the checkout nor this environment's editable
install can leak in. The third-party dependencies (TVM, numpy, onnx, ...) are this environment's:
its site-packages is added to the fresh one by a ``.pth`` line, a plain path, so the ``.pth``
files in it (the editable install's finder among them) do not run there. Installing so takes a
wheel build (about 10 s) instead of downloading the dependencies again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _packaged_copy(dest: Path) -> Path:
    """The files ``pip install .`` reads: pyproject, README and the package-dir folders."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in set(config["tool"]["setuptools"]["package-dir"].values()):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    return dest


def _run(args: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_non_editable_install_ships_cost_models(tmp_path, tiny_onnx):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MULAYER_DATA_DIR")}
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    python, mulayer = venv / "bin" / "python", venv / "bin" / "mulayer"
    site = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env
    ).stdout.strip()
    (Path(site) / "third_party_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: leave this environment's (editable) mulayer alone.
    src = _packaged_copy(tmp_path / "src")
    _run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", src],
        tmp_path,
        env,
    )

    where = _run(
        [
            python,
            "-c",
            "import json, mulayer, mulayer.cost_model as c;"
            "print(json.dumps([mulayer.__file__, str(c.data_dir()),"
            " [p.name for p, _ in c.shipped_models()]]))",
        ],
        tmp_path,
        env,
    )
    package, data, shipped = json.loads(where.stdout)
    assert Path(package).is_relative_to(venv) and Path(data).is_relative_to(venv)
    assert "cost-model-llvm-standin.zip" in shipped

    out = tmp_path / "tiny.mulayer"
    target = "mulayer -split=auto, llvm, llvm"
    compiled = _run([mulayer, "compile", tiny_onnx, "--target", target, "-o", out], tmp_path, env)
    # A shipped model was found (one trained on another CPU only adds an "other hardware" note).
    assert "no shipped cost model" not in compiled.stderr, compiled.stderr
    assert out.is_file()
    demo = _run([mulayer, "demo", "--json", "--repeat", "2"], tmp_path, env)
    assert all(row["check"] == "ok" for row in json.loads(demo.stdout))
