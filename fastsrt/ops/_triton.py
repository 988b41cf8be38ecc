"""Triton plumbing shared by the fused ops (fastsrt.ops.patch_embed, fastsrt.ops.warp_aggregate).

Kernels are written as plain functions in their modules and JIT-wrapped on first use
(``jit_kernels``): importing fastsrt never imports Triton, and since Triton picks compiled or
interpreted code when a function is wrapped, the mode is the one TRITON_INTERPRET names at the
first fused call (and is re-picked if it changes later), not at import. Where the kernels cannot
run (no Triton, CPU tensors outside the interpreter, another device) the ops fall back to torch
with one warning (``warn_once``), or raise ``Unavailable`` when a kernel launch is asked for
directly (``require``).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from functools import cache

import torch

from fastsrt.checks import Unavailable

_warned: set[str] = set()


def warn_once(message: str, stacklevel: int = 3) -> None:
    """A UserWarning the first time ``message`` comes up in this process, nothing after."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=stacklevel)


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


def unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on tensors of ``device``, or None when they can."""
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        return f"the Triton kernels do not run on {device.type} tensors"
    if device.type == "cpu" and not interpreting():
        return "the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    triton, error = _import()
    if triton is None:
        return f"Triton is not usable ({error})"
    return None


def runnable(tensor: torch.Tensor, fallback: str) -> bool:
    """Whether the Triton kernels can run on ``tensor``'s device; when not, warns once with the
    reason and ``fallback`` (what runs instead)."""
    reason = unavailable(tensor.device)
    if reason is not None:
        warn_once(f"{reason}: {fallback}", stacklevel=4)
    return reason is None


def require(tensor: torch.Tensor, what: str):
    """The triton module, or a RuntimeError saying why ``what`` cannot run on ``tensor``."""
    reason = unavailable(tensor.device)
    if reason is not None:
        raise Unavailable(f"{what} cannot run on this {tensor.device.type} tensor: {reason}")
    return load()


def jit_kernels(namespace: dict, names: tuple[str, ...]) -> None:
    """JIT-wraps the plain-function kernels ``names`` of a module (its ``globals()``) for the
    current mode and binds ``tl`` there; a no-op while the mode stays the one they were wrapped
    for. Kernels call each other through the module's globals, so all of a module's are wrapped."""
    triton = load()
    mode = interpreting()
    if namespace.get("_triton_interpreted") is mode:
        return
    namespace["tl"] = triton.language
    for name in names:
        function = namespace[name]
        namespace[name] = triton.jit(getattr(function, "fn", function))  # .fn: the plain function of a wrapped one
    namespace["_triton_interpreted"] = mode


def on_device(tensor: torch.Tensor):
    """The context a kernel launch for ``tensor`` runs in: its GPU as the current one (Triton
    launches on the current device), nothing for CPU tensors."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
