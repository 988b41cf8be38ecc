"""A non-editable install (a wheel) carries the extension's sources, and the loader finds them there."""
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="building a wheel needs setuptools")
def test_wheel_ships_the_extension_sources(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / "fastsrt", source / "fastsrt", ignore=shutil.ignore_patterns("__pycache__"))
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(tmp_path / "dist"), "."]
    subprocess.run(build, cwd=source, check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("fastsrt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    from fastsrt.dvt.extension import SOURCES

    assert {f"fastsrt/csrc/{name}" for name in SOURCES} <= names

    # installed from the wheel (not from this checkout), the loader's source folder is complete
    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    probe = ("import fastsrt.dvt.extension as e; assert all((e.CSRC / n).is_file() for n in e.SOURCES); "
             "print(e.CSRC)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()) == target / "fastsrt" / "csrc"
