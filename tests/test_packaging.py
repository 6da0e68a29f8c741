"""The wheel carries every subpackage and the run configs (as emorl_jax/configs/), so an installed package, e.g. a
Colab notebook's `%pip install git+...`, loads a config by name with no checkout around."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_subpackage():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "emorl_jax").rglob("__init__.py")}
    assert listed == found | {"emorl_jax.configs"}


def test_wheel_ships_the_configs(tmp_path):
    pytest.importorskip("setuptools", minversion="68")  # the build backend, used without build isolation (offline)
    src = tmp_path / "src"  # a copy, so that the build writes nothing into the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "tests", "notebooks", "benchmarks", "runs",
                                                             "build", ".whl", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("emorl_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"emorl_jax/configs/{p.name}" for p in (ROOT / "configs").glob("*.py")} <= names
    assert not any(n.startswith(("configs/", "tests/")) for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import emorl_jax.config as c; cfg = c.load_run_config('tiny_synthetic', 'rl.steps=7'); "
            "print(c.config_path('tiny_synthetic'), cfg.rl.steps)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": ""},
                         check=True, capture_output=True, text=True, timeout=300).stdout.split()
    assert out == [str(site / "emorl_jax" / "configs" / "tiny_synthetic.py"), "7"]
