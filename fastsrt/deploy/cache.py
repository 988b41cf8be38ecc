"""The on-disk cache of exported ONNX files and TensorRT engines.

A file is named by a key over everything that changes it: a hash of the module (its weights and
its configuration), the input shapes, the precision, the runtime and its version, and, for
TensorRT engines (built for one GPU), the GPU. Change any of these and a new file is built.
A file is used only while its bytes match the digest recorded after it was built
(``fastsrt.integrity``): a truncated or altered file is rebuilt, with a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from torch import nn

from fastsrt.integrity import record_digest, tensors_digest, why_not_intact

logger = logging.getLogger("fastsrt.deploy")


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
    digest.update(tensors_digest(module.state_dict()).encode())
    return digest.hexdigest()


def cache_key(weights: str, input_shape, batch: tuple[int, int, int], precision: str, runtime: str,
              device: str = "") -> str:
    """The file name stem for one build: weights hash, per-sample input shape, (min, opt, max)
    batch, precision, runtime with version (e.g. "tensorrt-10.3.0") and target device."""
    fields = {"weights": weights, "input_shape": [int(v) for v in input_shape], "batch": [int(v) for v in batch],
              "precision": precision, "runtime": runtime, "device": device}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def cached_file(path: Path, build: Callable[[Path], object], what: str) -> Path:
    """``path``, first built by ``build(path)`` unless it is there and matches the digest recorded
    after its last build. A file there that does not match (truncated, altered, or never
    recorded) is rebuilt with a warning naming it; ``what`` names the kind of file."""
    damage = why_not_intact(path)
    if not damage:
        return path
    if path.exists():
        warnings.warn(f"the cached {what} {path} {damage}: rebuilding it", stacklevel=3)
    logger.info("fastsrt.deploy: building the %s %s", what, path)
    build(path)
    record_digest(path)
    return path
