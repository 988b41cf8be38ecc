"""The packages, with the top-level csrc/ (the extension's C++/CUDA sources, compiled at first use)
mapped in as fastsrt/csrc, so that the wheel and the sdist carry it; everything else is in
pyproject.toml."""
from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["fastsrt", "fastsrt.*"]), "fastsrt.csrc"],
    package_dir={"fastsrt.csrc": "csrc"},
    package_data={"fastsrt.csrc": ["*.h", "*.cpp", "*.cu"], "fastsrt.deploy": ["*.json"]},
)
