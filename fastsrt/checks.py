"""Validation of user input: each check raises an exception that names the bad value."""
from __future__ import annotations

from collections.abc import Iterable

import torch


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(repr(c) for c in choices)}")


def check_images(images, channels: int | None = None, min_size: int = 1,
                 weights: torch.Tensor | None = None) -> None:
    """A batch of images: a floating (B, channels, H, W) tensor, B >= 1, finite, at least min_size
    pixels a side; where ``weights`` (a parameter of the model that takes them) is given, matching
    it (``check_matches_model``)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got shape {tuple(images.shape)}")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"images must have {channels} channels, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor (normalised), got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"images is an empty batch (shape {tuple(images.shape)}): pass at least one image")
    height, width = images.shape[-2:]
    if height < min_size or width < min_size:
        raise ValueError(f"images of shape {tuple(images.shape)} are smaller than one patch ({min_size} px)")
    if weights is not None:
        check_matches_model("images", images, weights)
    if images.device.type != "meta" and not torch.isfinite(images).all():  # meta tensors hold no values
        bad = (~torch.isfinite(images)).sum().item()
        raise ValueError(f"images contain {bad} NaN or infinite values")


def check_matches_model(name: str, inputs: torch.Tensor, weights: torch.Tensor) -> None:
    """Inputs on the device of ``weights`` (a parameter of the model that takes them), and not
    float64 for a model that is not (no autocast takes float64)."""
    if inputs.device != weights.device:
        raise ValueError(f"{name} are on {inputs.device} but the model is on {weights.device}: move one to the "
                         f"other, e.g. {name}.to({str(weights.device)!r})")
    if inputs.dtype == torch.float64 and weights.dtype != torch.float64:
        raise TypeError(f"{name} are float64 but the model is {weights.dtype}: pass {name}.to({weights.dtype})")
