"""Detecting files that fastsrt wrote and reads back which were damaged or altered in between.

Files that are rebuilt when bad (cached ONNX files, TensorRT engines, the compiled extension)
get a sha256 of their bytes recorded beside them, in ``<file>.sha256``, once they are complete;
a file whose bytes no longer match, or that has no record (written before records existed, or
its writer was killed before recording), is not used but rebuilt. safetensors files carry the
sha256 of their tensors in their own metadata instead (``fastsrt.io.save_tensors``), checked
when they are loaded.

These digests detect accidental damage (a truncated or partial copy, a full disk, bit rot,
another program's writes); they cannot stop someone who rewrites the record as well.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def record_path(path: str | os.PathLike) -> Path:
    """Where the digest of ``path`` is recorded: ``<path>.sha256``."""
    path = Path(path)
    return path.with_name(f"{path.name}.sha256")


def record_digest(path: str | os.PathLike) -> None:
    """Records the digest of the complete file ``path`` beside it. A write cut short leaves a
    record that matches nothing, so the file is rebuilt: the record needs no atomic write."""
    record_path(path).write_text(file_digest(path))


def why_not_intact(path: str | os.PathLike) -> str:
    """Why ``path`` cannot be trusted ("" where its bytes match the digest recorded after it was
    written): it is missing, it has no record, or it does not match its record."""
    record = record_path(path)
    if not Path(path).is_file():
        return "is missing"
    if not record.is_file():
        return "has no digest recorded after it was written"
    if record.read_text().strip() != file_digest(path):
        return "does not match the digest recorded after it was written (truncated or altered?)"
    return ""
