"""Backbones: any timm ViT (or a plain callable) -> token grids (B, C, h, w) of chosen layers."""
from __future__ import annotations

import contextlib
import os
import socket
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import torch
import torch.nn.functional as F
from torch import nn

from fastsrt._torchvision_compat import ensure_torchvision_imports
from fastsrt.checks import check_images
from fastsrt.errors import Unavailable
from fastsrt.io import IMAGENET_MEAN, IMAGENET_STD

ensure_torchvision_imports()
import timm  # noqa: E402  (needs the torchvision fix above on a CPU-only torch)

Layers = int | Sequence[int]


@dataclass
class BackboneOutput:
    """Token grids of the requested layers, in the order they were asked for.

    tokens: one (B, C, h, w) tensor per layer (the model's final norm applied, prefix tokens dropped).
    prefix: one (B, P, C) tensor per layer with the P prefix tokens (CLS, registers), when asked for.
    """

    tokens: list[torch.Tensor]
    prefix: list[torch.Tensor] | None = None


def load_timm_model(name: str, pretrained: bool | str = True, seed: int | None = None, **kwargs) -> nn.Module:
    """``timm.create_model(name)`` for feature extraction at any image size.

    pretrained: True loads timm's pretrained weights (needs the network or a local cache), False
    gives random weights, "auto" tries the weights and falls back to random ones with a warning.
    Where the Hugging Face hub cannot be reached, weights come from the cache only, so that it
    answers at once offline; weights that cannot be had raise ``Unavailable`` saying what to do.
    seed: random weights are drawn from torch's CPU generator seeded with it, which is restored
    afterwards (the caller's random state is left as it was); None draws them from that generator
    as it stands.
    """
    kwargs.setdefault("dynamic_img_size", True)
    kwargs.setdefault("num_classes", 0)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: timm initialises on the CPU
            torch.random.default_generator.manual_seed(seed)
            return load_timm_model(name, pretrained, **kwargs)
    if pretrained == "auto":
        try:
            with _hub_offline_unless_reachable() as online:
                return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as error:  # no network, no cache, no weights for this name: all the same here
            if "Unknown model" in str(error):
                raise ValueError(f"unknown timm model {name!r}") from error
            if online:
                reason = (str(error).splitlines() or [type(error).__name__])[0][:100]
            else:
                reason = "the Hugging Face hub cannot be reached and no cached copy exists"
            warnings.warn(f"no pretrained weights for {name} ({reason}): using RANDOM weights", stacklevel=2)
            return timm.create_model(name, pretrained=False, **kwargs)
    if pretrained not in (True, False):
        raise ValueError(f"pretrained={pretrained!r} is not one of True, False, 'auto'")
    online = True  # whether the hub could be reached, where weights were asked for
    try:
        if not pretrained:
            return timm.create_model(name, pretrained=False, **kwargs)
        with _hub_offline_unless_reachable() as online:
            return timm.create_model(name, pretrained=True, **kwargs)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise ValueError(f"unknown timm model {name!r}") from error
        raise
    except OSError as error:  # no network and no cached copy, a failed download, an unwritable cache
        raise _weights_unavailable(name, error, online) from None


def _weights_unavailable(name: str, error: OSError, hub_reachable: bool) -> Unavailable:
    """The one-line error for pretrained weights that cannot be had, with the ways around it."""
    from huggingface_hub import constants

    cache = f"the Hugging Face cache ({constants.HF_HUB_CACHE}) has no copy"
    if constants.HF_HUB_OFFLINE:
        reason = f"HF_HUB_OFFLINE is set and {cache}"
    elif not hub_reachable:
        reason = f"{constants.ENDPOINT} cannot be reached and {cache}"
    else:
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
    return Unavailable(f"the pretrained weights of {name} could not be had: {reason}. Use random weights "
                       "(pretrained=False, --pretrained no), a timm model built from a local weights file "
                       "(timm.create_model(name, pretrained=True, pretrained_cfg_overlay={'file': PATH})), or "
                       "download them once where the network is reachable (they are then cached)")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface_hub may reach its endpoint: not offline (HF_HUB_OFFLINE), and the
    endpoint's host answers, or a proxy is set (which only a real request can test)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(variable) for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline_unless_reachable():
    """Puts huggingface_hub in offline mode (local cache only) while the hub cannot be reached,
    instead of letting each download retry for about a minute. Yields whether it is reachable."""
    if _hub_reachable():
        yield True
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        constants.HF_HUB_OFFLINE = before


def model_name(source) -> str | None:
    """timm's "architecture.tag" name of a timm model or of a fastsrt Backbone around one; None
    where it is unknown (a callable, a model built without timm's configuration)."""
    model = getattr(source, "model", source)
    config = getattr(model, "pretrained_cfg", None) or {}
    architecture = config.get("architecture")
    if not architecture:
        return None
    return f"{architecture}.{config['tag']}" if config.get("tag") else architecture


def _square(value, what: str) -> int:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if pair[0] != pair[1]:
        raise ValueError(f"only square {what}s are supported, got {pair}")
    return int(pair[0])


class TokenSource(nn.Module):
    """What SRT and DVT need of a backbone: patch size, layer count, input checks and padding.

    Image sides that are not a multiple of the patch size raise a ValueError unless
    ``pad_to_patch=True``, which pads bottom and right with zeros (the mean colour of a
    normalised image) to the next multiple (``prepare``); ``crop`` cuts pixel outputs back.
    """

    def __init__(self, patch_size: int, in_chans: int, num_layers: int, num_prefix_tokens: int, pad_to_patch: bool):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_layers = num_layers
        self.num_prefix_tokens = num_prefix_tokens
        self.pad_to_patch = pad_to_patch
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD  # the input normalisation the model expects

    def layer_indices(self, layers: Layers) -> list[int]:
        """Absolute block indices of ``layers`` (negative counts from the last block)."""
        requested = list(layers) if isinstance(layers, (list, tuple)) else [layers]
        if not requested:
            raise ValueError("layers must name at least one block")
        absolute = []
        for layer in requested:
            if isinstance(layer, bool) or not isinstance(layer, int) or not -self.num_layers <= layer < self.num_layers:
                raise ValueError(f"layer {layer!r} is not a block index of this model "
                                 f"(an int from {-self.num_layers} to {self.num_layers - 1})")
            absolute.append(layer % self.num_layers)
        return absolute

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Checks a batch of images and pads it to a multiple of the patch size if allowed."""
        check_images(images, self.in_chans, min_size=self.patch_size, weights=next(self.parameters(), None))
        height, width = images.shape[-2:]
        pad_h, pad_w = -height % self.patch_size, -width % self.patch_size
        if pad_h or pad_w:
            if not self.pad_to_patch:
                raise ValueError(
                    f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}; "
                    "resize it or pass pad_to_patch=True"
                )
            images = F.pad(images, (0, pad_w, 0, pad_h))
        self.check_size_allowed(tuple(images.shape[-2:]))
        return images

    @staticmethod
    def crop(pixels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Pixel-resolution outputs (..., H', W') of a batch that ``prepare`` padded, cut back to
        the input's size (height, width): the padding is bottom and right."""
        return pixels[..., : size[0], : size[1]]

    def check_size_allowed(self, size: tuple[int, int]) -> None:
        """Raises if the model cannot take images of this (padded) size."""


class Backbone(TokenSource):
    """A timm Vision Transformer as a source of token grids.

    Generic over timm ViTs (VisionTransformer, Eva, ...) through ``forward_intermediates``,
    ``num_prefix_tokens`` and ``patch_embed``. ``layers=-1`` gives exactly the patch tokens of
    ``model.forward_features`` (after the final norm), reshaped to (B, C, h, w). For a model
    name, ``seed`` seeds its random weights (see load_timm_model).
    """

    def __init__(self, model: nn.Module | str, pretrained: bool | str = True, pad_to_patch: bool = False,
                 seed: int | None = None, **timm_kwargs):
        if isinstance(model, str):
            model = load_timm_model(model, pretrained=pretrained, seed=seed, **timm_kwargs).eval()
        elif getattr(model, "training", False):
            warnings.warn(f"the {type(model).__name__} is in training mode (dropout and drop-path active); "
                          "call model.eval() for features", stacklevel=2)
        if not all(hasattr(model, a) for a in ("forward_intermediates", "patch_embed", "blocks")):
            raise TypeError(
                f"{type(model).__name__} is not a timm ViT (needs forward_intermediates, patch_embed and "
                "blocks); wrap other callables in fastsrt.CallableBackbone"
            )
        super().__init__(
            patch_size=_square(model.patch_embed.patch_size, "patch"),
            in_chans=int(model.patch_embed.proj.in_channels),
            num_layers=len(model.blocks),
            num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)),
            pad_to_patch=pad_to_patch,
        )
        self.model = model
        self.embed_dim = int(model.embed_dim)
        config = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(config.get("mean", IMAGENET_MEAN))
        self.std = tuple(config.get("std", IMAGENET_STD))

    def check_size_allowed(self, size: tuple[int, int]) -> None:
        patch_embed = self.model.patch_embed
        fixed = getattr(patch_embed, "strict_img_size", False) and not getattr(self.model, "dynamic_img_size", False)
        if fixed and size != tuple(patch_embed.img_size):
            raise ValueError(
                f"this model takes only {patch_embed.img_size[0]}x{patch_embed.img_size[1]} images, got "
                f"{size[0]}x{size[1]}; create it with dynamic_img_size=True (fastsrt does for model names)"
            )

    def forward(self, images: torch.Tensor, layers: Layers = -1, return_prefix: bool = False) -> BackboneOutput:
        absolute = self.layer_indices(layers)
        images = self.prepare(images)
        taken = sorted(set(absolute))
        outputs = self.model.forward_intermediates(
            images,
            indices=taken,
            norm=True,
            stop_early=True,
            output_fmt="NCHW",
            intermediates_only=True,
            return_prefix_tokens=return_prefix and self.num_prefix_tokens > 0,
        )
        if return_prefix and self.num_prefix_tokens > 0:
            tokens = [spatial for spatial, _ in outputs]
            prefix = [prefix for _, prefix in outputs]
        else:
            tokens = list(outputs)
            empty = images.new_zeros(images.shape[0], 0, self.embed_dim)
            prefix = [empty] * len(taken) if return_prefix else None
        order = [taken.index(layer) for layer in absolute]
        return BackboneOutput(
            tokens=[tokens[i] for i in order],
            prefix=[prefix[i] for i in order] if prefix is not None else None,
        )


class CallableBackbone(TokenSource):
    """Any callable mapping images (N, 3, H, W) to token grids (N, C, H/p, W/p), e.g. a custom
    network or a synthetic test backbone. It has one "layer" (-1) and no prefix tokens."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor], patch_size: int, in_chans: int = 3,
                 pad_to_patch: bool = False):
        if not callable(function):
            raise TypeError(f"function must be callable, got {type(function).__name__}")
        super().__init__(int(patch_size), in_chans, num_layers=1, num_prefix_tokens=0, pad_to_patch=pad_to_patch)
        self.function = function

    def forward(self, images: torch.Tensor, layers: Layers = -1, return_prefix: bool = False) -> BackboneOutput:
        self.layer_indices(layers)
        images = self.prepare(images)
        tokens = self.function(images)
        expected = (images.shape[0], images.shape[2] // self.patch_size, images.shape[3] // self.patch_size)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 4 \
                or (tokens.shape[0], *tokens.shape[2:]) != expected:
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"backbone callable must return (N, C, {expected[1]}, {expected[2]}) token grids, "
                             f"got {got}")
        count = 1 if isinstance(layers, int) else len(layers)
        prefix = [tokens.new_zeros(tokens.shape[0], 0, tokens.shape[1])] * count if return_prefix else None
        return BackboneOutput(tokens=[tokens] * count, prefix=prefix)


def as_backbone(model, patch_size: int | None = None, pretrained: bool | str = True,
                pad_to_patch: bool = False) -> nn.Module:
    """A Backbone for a timm model or name, a CallableBackbone for a callable with ``patch_size``;
    fastsrt backbones are returned as they are."""
    if isinstance(model, TokenSource):
        return model
    if isinstance(model, str) or hasattr(model, "forward_intermediates"):
        return Backbone(model, pretrained=pretrained, pad_to_patch=pad_to_patch)
    if callable(model):
        if patch_size is None:
            raise ValueError("a plain callable backbone needs patch_size")
        return CallableBackbone(model, patch_size, pad_to_patch=pad_to_patch)
    raise TypeError(f"model must be a timm ViT, a timm model name or a callable, got {type(model).__name__}")
