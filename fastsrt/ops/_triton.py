"""Triton plumbing shared by the fused ops.

Each op keeps its kernels in a plain ``@triton.jit`` module (``fastsrt/ops/<op>/kernels.py``)
that only ``kernels(name)`` imports, when a fused path first runs: importing fastsrt never
imports Triton. ``triton.jit`` picks compiled or interpreted code when it decorates a function,
so the kernels run in the mode TRITON_INTERPRET names at the first fused call, and ``kernels``
re-imports the module if the mode changes later.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from functools import cache
from types import ModuleType

import torch


@cache
def _import():
    """(triton, None), or (None, why it cannot be imported)."""
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as error:  # not installed, or installed and broken: the same for the user
        return None, f"{type(error).__name__}: {error}"
    return triton, None


def load():
    """The triton module, or None where it cannot be imported. Never raises."""
    return _import()[0]


def interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter now (the values Triton accepts as true)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y")


def not_supported_reasons(device: torch.device) -> list[str]:
    """Why Triton kernels cannot run on tensors of ``device`` (empty when they can)."""
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        return [f"the Triton kernels do not run on {device.type} tensors"]
    if device.type == "cpu" and not interpreting():
        return ["the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"]
    triton, error = _import()
    if triton is None:
        return [f"Triton is not usable ({error})"]
    return []


def kernels(module_name: str) -> ModuleType:
    """The plain ``@triton.jit`` module ``module_name``, imported on first use and re-imported
    when TRITON_INTERPRET has changed since (its kernels were decorated for the other mode)."""
    mode = interpreting()
    module = sys.modules.get(module_name)
    if module is None:
        module = importlib.import_module(module_name)
    elif module.__dict__.get("_fastsrt_interpreted") is not mode:
        module = importlib.reload(module)
    module._fastsrt_interpreted = mode
    return module


def on_device(tensor: torch.Tensor):
    """The context a kernel launch for ``tensor`` runs in: its GPU as the current one (Triton
    launches on the current device), nothing for CPU tensors."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
