"""Every install carries the extension's C++/CUDA sources (the top-level csrc/): the sdist has them,
and a wheel built from that sdist, installed into a fresh virtual environment outside the checkout,
builds and runs the extension from its own copy."""
import os
import shutil
import site
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "fastsrt", "csrc")  # what the build reads
SOURCES = ("grid_encoding.h", "grid_encoding.cpp", "grid_encoding_cuda.cu")

# Run in the new environment: the extension, built there, against the reference on random inputs.
PROBE = textwrap.dedent("""
    import torch

    import fastsrt
    from fastsrt.ops.grid_encoding import GridEncodingConfig, grid_encode, grid_encode_reference
    from fastsrt.ops.grid_encoding.extension import load_extension, source_folder

    config = GridEncodingConfig(levels=5, features=3, log2_table_size=8, base_resolution=4, max_resolution=64)
    generator = torch.Generator().manual_seed(0)
    coords = torch.rand(2, 300, 2, generator=generator)
    table = torch.randn(2, config.table_rows, config.features, generator=generator)
    fast = grid_encode(coords, table, config, impl="extension")
    expected = grid_encode_reference(coords, table, config)
    error = ((fast - expected).norm() / expected.norm()).item()
    assert error <= 1e-6, error
    print(fastsrt.__file__)
    print(source_folder())
    print(load_extension().__file__)
""")


ENV = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
PIP = [sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check"]


def run(command, **kwargs):
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, command))}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def fresh_venv(folder: Path, wheel: Path) -> Path:
    """A virtual environment with the wheel installed (by this interpreter's pip) that sees this
    interpreter's third-party packages (torch, ...) through a .pth file written after the install,
    but neither this checkout nor an editable fastsrt (a .pth file's folders are added to sys.path
    without running their own .pth files, such as an editable install's finder); its python."""
    run([sys.executable, "-m", "venv", "--without-pip", str(folder)])
    python = folder / "bin" / "python"
    run([*PIP, "--python", str(python), "install", "--no-deps", str(wheel)], cwd=folder, env=ENV)
    venv_site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    (venv_site / "outer_packages.pth").write_text("".join(f"{path}\n" for path in site.getsitepackages()))
    return python


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler to build the extension")
def test_a_wheel_in_a_fresh_venv_builds_and_runs_the_extension(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source)
    dist = tmp_path / "dist"
    run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"], cwd=source)
    (sdist,) = dist.glob("fastsrt-*.tar.gz")
    top = sdist.name.removesuffix(".tar.gz")
    assert {f"{top}/csrc/{name}" for name in SOURCES} <= set(tarfile.open(sdist).getnames())

    # the wheel, built from the sdist: it carries every module and the sources as fastsrt/csrc
    run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(sdist)], cwd=tmp_path)
    (wheel,) = dist.glob("fastsrt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "fastsrt").rglob("*.py")}
    assert modules <= names and {f"fastsrt/csrc/{name}" for name in SOURCES} <= names

    venv = tmp_path / "venv"
    python = fresh_venv(venv, wheel)
    # ninja (torch's extension builds run it) may live beside this interpreter, as pip installs it
    path = os.pathsep.join([str(venv / "bin"), ENV.get("PATH", ""), str(Path(sys.executable).parent)])
    env = {**ENV, "PATH": path, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    printed = run([str(python), "-c", PROBE], cwd=tmp_path, env=env)
    module_file, folder, extension_file = (Path(line) for line in printed.split())
    assert module_file.is_relative_to(venv) and folder.is_relative_to(venv), (module_file, folder)
    assert folder == module_file.parent / "csrc"
    assert extension_file.is_relative_to(tmp_path / "extensions")
