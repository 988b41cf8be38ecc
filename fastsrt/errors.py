"""fastsrt's error vocabulary: ``Unavailable`` for what cannot run on this machine, and
``warn_once`` for the one warning a fallback gives.

A user error (a bad value, a missing file) is a ValueError, TypeError or FileNotFoundError naming
the value; ``Unavailable`` says that something asked for (TensorRT, ONNX Runtime, Triton, a
compiler, a GPU) is not here and why.
"""
from __future__ import annotations

import warnings

_warned: set[str] = set()


class Unavailable(RuntimeError):
    """What was asked for cannot run on this machine (no compiler, GPU, Triton, TensorRT, ONNX
    Runtime...); the message says why and, where it helps, what to install."""


def warn_once(message: str, stacklevel: int = 3) -> None:
    """A UserWarning the first time ``message`` comes up in this process, nothing after."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=stacklevel)
