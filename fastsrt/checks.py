"""Validation of user input: each check raises an exception that names the bad value."""
from __future__ import annotations

from collections.abc import Iterable

import torch


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(repr(c) for c in choices)}")


def check_images(images, channels: int | None = None, min_size: int = 1) -> None:
    """A batch of images: a floating (B, channels, H, W) tensor, finite, at least min_size pixels a side."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got shape {tuple(images.shape)}")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"images must have {channels} channels, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor (normalised), got dtype {images.dtype}")
    height, width = images.shape[-2:]
    if images.shape[0] == 0 or height < min_size or width < min_size:
        raise ValueError(f"images of shape {tuple(images.shape)} are smaller than one patch ({min_size} px)")
    if not torch.isfinite(images).all():
        bad = (~torch.isfinite(images)).sum().item()
        raise ValueError(f"images contain {bad} NaN or infinite values")
