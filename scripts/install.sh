#!/usr/bin/env bash
# Sets up .venv with fastsrt (editable) and its dependencies, never replacing the torch it finds.
#   bash scripts/install.sh          # runtime
#   bash scripts/install.sh dev      # + test tools, the ONNX and video extras
# The venv sees the system's site-packages: a torch already installed there (a CUDA build, say)
# is used as it is. Every pip call goes through one constraints file (constraints.txt, or the
# installed versions of the torch family where a torch is already present), so timm and
# torchvision can never pull in another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    "") spec="." ;;
    dev) spec=".[dev,onnx,video]" ;;
    *) echo "usage: bash scripts/install.sh [dev]" >&2; exit 2 ;;
esac

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv --system-site-packages .venv
.venv/bin/python - <<'PY'
import importlib.metadata as md

pins = {}
for line in open("constraints.txt"):
    line = line.split("#")[0].strip()
    if line:
        name, version = line.split("==")
        pins[name] = version
installed = {}
for name in pins:
    try:
        installed[name] = md.version(name)
    except md.PackageNotFoundError:
        pass
if "torch" in installed:
    if installed["torch"].split("+")[0] != pins["torch"]:
        pins = {}  # our torchvision/triton pins belong to torch 2.13: let pip match the installed torch
    pins.update(installed)
    print(f"fastsrt install: keeping the installed torch {installed['torch']}")
with open(".venv/constraints.txt", "w") as f:
    f.writelines(f"{name}=={version}\n" for name, version in pins.items())
PY
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c .venv/constraints.txt -e "$spec"
.venv/bin/python -c "import fastsrt, torch; print(f'fastsrt {fastsrt.__version__} ready, torch {torch.__version__}')"
