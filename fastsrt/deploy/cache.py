"""The on-disk cache of exported ONNX files and TensorRT engines.

A file is named by a key over everything that changes it: a hash of the module (its weights and
its configuration), the input shapes, the precision, the runtime and its version, and, for
TensorRT engines (built for one GPU), the GPU. Change any of these and a new file is built.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn


def default_cache_dir() -> Path:
    """$FASTSRT_CACHE, else ~/.cache/fastsrt (XDG_CACHE_HOME respected)."""
    if os.environ.get("FASTSRT_CACHE"):
        return Path(os.environ["FASTSRT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastsrt"


def module_hash(module: nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes, bytes, in name order) and of its
    configuration (``module.config`` where it has one, else its repr)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(getattr(module, "config", None) or repr(module), sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(weights: str, input_shape, batch: tuple[int, int, int], precision: str, runtime: str,
              device: str = "") -> str:
    """The file name stem for one build: weights hash, per-sample input shape, (min, opt, max)
    batch, precision, runtime with version (e.g. "tensorrt-10.3.0") and target device."""
    fields = {"weights": weights, "input_shape": [int(v) for v in input_shape], "batch": [int(v) for v in batch],
              "precision": precision, "runtime": runtime, "device": device}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]
