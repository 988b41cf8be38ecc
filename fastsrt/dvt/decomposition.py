"""DVT stage 1, as docs/method.md describes it: per image, the raw ViT features of many views are decomposed as

    raw(view, token) ~ F(global coordinate of the token) + G(token position in the view) + h(raw)

F (grid encoding + MLP) is the clean, view-independent feature field; G, one (C, K, K) map shared
by all views, is the position artifact; h, an MLP on the raw feature, is the residual.

Speed: several images are fitted at once with batched parameters (every tensor has a leading
image dimension; the loss is a sum over images and Adam is elementwise, so the images stay
independent), each step is a handful of batched ops (index_select, baddbmm, one encoding call, a
fused or foreach Adam), the raw tokens of all views are cached in float16, and the encoding runs
in fastsrt's C++/CUDA extension.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fastsrt.backbone import TokenSource, as_backbone
from fastsrt.checks import check_choice
from fastsrt.dispatch import Implementation
from fastsrt.dvt.crops import render_views, sample_crops, token_coordinates
from fastsrt.dvt.schedule import warmup_cosine
from fastsrt.io import load_image, normalize
from fastsrt.ops.grid_encoding import GridEncodingConfig, choose_encoding
from fastsrt.options import DTYPE_NAMES, ENCODING_IMPLS, torch_dtype

DRAW_BLOCK = 64  # steps whose token samples are drawn at once (one randint per image per block)


@dataclass(frozen=True)
class DecomposeConfig:
    """Stage-1 settings; the defaults are the DVT authors' ("DVT stage 1" in docs/method.md).

    views: the full image + views-1 random crops. size: the image and every view are resized to
    size x size (a multiple of the patch size). crop_scale / crop_ratio / flip_probability: the
    RandomResizedCrop + horizontal flip of the crops. tokens_per_step: tokens sampled per step
    from all cached tokens. iterations: steps; the first half fits F and G on the distance loss,
    the second freezes G and adds h. lr / min_lr / warmup: linear warm-up over that fraction of
    the iterations, then cosine from lr to min_lr. betas / eps / weight_decay: Adam.
    artifact_std: G's N(0, std^2) init. residual_weight / sparsity_weight: the weights of
    mse(h, stopgrad(raw - F - G)) and mean|h|. cache_dtype: precision of the cached raw tokens
    ("float16", "bfloat16" or "float32"; float16 switches to float32 with a warning if a feature
    overflows it). backbone_dtype: "float32" (the authors'), or "bfloat16" / "float16" to run
    the backbone under autocast (faster on GPUs; the features change slightly, by how much
    bench/dvt_fit.py reports). view_batch: views per backbone forward.
    """

    views: int = 769
    iterations: int = 20000
    size: int = 518
    crop_scale: tuple[float, float] = (0.1, 0.5)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_probability: float = 0.5
    tokens_per_step: int = 2048
    encoding: GridEncodingConfig = GridEncodingConfig()
    lr: float = 1e-2
    min_lr: float = 1e-3
    warmup: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    weight_decay: float = 1e-5
    artifact_std: float = 0.02
    residual_weight: float = 0.1
    sparsity_weight: float = 0.02
    cache_dtype: str = "float16"
    backbone_dtype: str = "float32"
    view_batch: int = 32

    def __post_init__(self):
        for name in ("views", "size", "tokens_per_step", "view_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 2:
            raise ValueError(f"iterations must be an int >= 2 (two phases), got {self.iterations!r}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        if not 0 <= self.flip_probability <= 1:
            raise ValueError(f"flip_probability must be in [0, 1], got {self.flip_probability}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"need 0 < min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not isinstance(self.encoding, GridEncodingConfig):
            raise TypeError(f"encoding must be a GridEncodingConfig, got {type(self.encoding).__name__}")
        check_choice("cache_dtype", self.cache_dtype, DTYPE_NAMES)
        check_choice("backbone_dtype", self.backbone_dtype, DTYPE_NAMES)

    def learning_rate(self, step: int) -> float:
        """Linear warm-up to lr, then cosine from lr to min_lr at the last step (``warmup_cosine``)."""
        return warmup_cosine(step, self.iterations, self.lr, self.min_lr, round(self.warmup * self.iterations))


@dataclass
class Decomposition:
    """One image's decomposition, each map (C, K, K) float32 on the CPU on the full image's
    K x K token grid: raw (the full image's raw features), clean (F), artifact (G), residual
    (h(raw)). losses: (iterations,) the training loss per step. seconds: this image's share of
    the wall time of "features" (views + backbone) and "fit". encoding: "extension" or
    "reference", the grid encoding that ran."""

    raw: torch.Tensor
    clean: torch.Tensor
    artifact: torch.Tensor
    residual: torch.Tensor
    losses: torch.Tensor
    seconds: dict[str, float] = field(default_factory=dict)
    encoding: str = ""

    @property
    def final_loss(self) -> float:
        """The mean loss over the last 5% of the steps (at least one)."""
        tail = max(1, len(self.losses) // 20)
        return float(self.losses[-tail:].mean())


@dataclass
class ViewFeatures:
    """The cached raw tokens of B images: cache (B, V*K*K, C) in the cache dtype, view-major,
    tokens row-major within a view (view 0 is the full image); coords (B, V*K*K, 2) float32 global
    (x, y) of each token; raw (B, C, K, K) float32, the full image's features."""

    cache: torch.Tensor
    coords: torch.Tensor
    raw: torch.Tensor
    seconds: float


def decompose(image, model, views: int = 769, iterations: int = 20000, seed: int | Sequence[int] = 0, *,
              layer: int = -1, patch_size: int | None = None, pretrained: bool | str = True, device=None,
              impl: str = "auto", progress: bool = False, **settings) -> Decomposition | list[Decomposition]:
    """DVT stage 1 on one image, or on a list of images fitted together (then a list).

    image: a (3, H, W) float tensor in [0, 1] (RGB, not normalised) or an image file path.
    model: a timm ViT, a timm model name, a fastsrt Backbone, or a callable mapping images
        (N, 3, S, S) to token grids (N, C, S/p, S/p) (then ``patch_size`` is required); a module
        is used in the mode it is in (put a timm model in eval mode: dropout and drop-path are
        on in training mode), a model fastsrt creates from a name is put in eval mode.
    seed: for every image, or one per image. An image's random draws (crops, initialisation of
        F, G and h, token samples) come from its seed alone, so its result is the same fitted
        alone or with other images.
    settings: any other DecomposeConfig field (size, crop_scale, tokens_per_step, encoding, lr, ...).
    layer: the block whose tokens are decomposed (-1: the final normed tokens).
    device: where features and fit run (default: the model's device; the model is moved there).
    impl: the grid encoding, "auto", "extension" or "reference". progress: a bar over the steps.
    """
    check_choice("impl", impl, ENCODING_IMPLS)
    config = DecomposeConfig(views=views, iterations=iterations, **settings)
    backbone = backbone_for(model, patch_size=patch_size, pretrained=pretrained)
    if device is not None:
        backbone = backbone.to(device)
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise ValueError("no images given")
    features = extract_view_features([as_image(x) for x in images], backbone, config, layer=layer, seed=seed,
                                     device=device)
    results = fit_decomposition(features, config, seed=seed, impl=impl, progress=progress)
    return results if isinstance(image, (list, tuple)) else results[0]


def backbone_for(model, patch_size: int | None = None, pretrained: bool | str = True) -> TokenSource:
    """``as_backbone``, with a model created from a name put in eval mode."""
    backbone = as_backbone(model, patch_size=patch_size, pretrained=pretrained)
    return backbone.eval() if isinstance(model, str) else backbone


def as_image(image) -> torch.Tensor:
    """A (3, H, W) float tensor in [0, 1], read from a path if one is given."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(Path(image))
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a (3, H, W) tensor or a file path, got {got}")
    if not image.is_floating_point():
        raise TypeError(f"image must be a float tensor in [0, 1], got dtype {image.dtype}")
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values")
    low, high = image.min().item(), image.max().item()
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(f"image values must be in [0, 1] (RGB, not normalised), got range [{low:.3g}, {high:.3g}]")
    return image


def per_image_seeds(seed: int | Sequence[int], images: int) -> list[int]:
    """One seed per image: ``seed`` for every image, or the sequence given (one per image)."""
    seeds = [seed] * images if isinstance(seed, int) else list(seed)
    if len(seeds) != images or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seed must be an int or one int per image ({images}), got {seed!r}")
    return seeds


def extract_view_features(images: list[torch.Tensor], backbone: TokenSource, config: DecomposeConfig, layer: int = -1,
                          seed: int | Sequence[int] = 0, device=None) -> ViewFeatures:
    """Resizes each (3, H, W) image to size x size (bicubic), renders its views (the full image
    and random crops drawn from the image's seed), runs the backbone on them and caches every
    view's tokens."""
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(f"layer must be one int block index, got {layer!r}")
    backbone.layer_indices(layer)
    if config.size % backbone.patch_size:
        raise ValueError(f"size {config.size} is not a multiple of the patch size {backbone.patch_size}")
    device = torch.device(device) if device is not None else _device_of(backbone)
    start = time.perf_counter()
    grid = config.size // backbone.patch_size
    tokens_per_view = grid * grid
    crops = [sample_crops(config.views, config.size, config.crop_scale, config.crop_ratio, config.flip_probability,
                          torch.Generator().manual_seed(image_seed))
             for image_seed in per_image_seeds(seed, len(images))]
    cache, raw = None, []
    with torch.no_grad():
        for b, image in enumerate(images):
            square = F.interpolate(image[None].float().to(device), size=(config.size, config.size), mode="bicubic",
                                   align_corners=False, antialias=True)[0].clamp(0, 1)
            square = normalize(square, backbone.mean, backbone.std)
            for first in range(0, config.views, config.view_batch):
                indices = range(first, min(config.views, first + config.view_batch))
                views = render_views(square, crops[b], indices)
                with _autocast(device, config.backbone_dtype):
                    tokens = backbone(views, layer).tokens[0]
                if first == 0:
                    raw.append(tokens[0].float())
                    if cache is None:
                        cache = torch.empty(len(images), config.views * tokens_per_view, tokens.shape[1],
                                            dtype=torch_dtype(config.cache_dtype), device=device)
                cache = _fit_cache_dtype(cache, tokens)
                rows = tokens.permute(0, 2, 3, 1).reshape(-1, tokens.shape[1])
                cache[b, first * tokens_per_view:first * tokens_per_view + len(rows)] = rows
    coords = torch.stack([token_coordinates(c, grid).reshape(-1, 2) for c in crops]).to(device)
    _synchronize(device)
    return ViewFeatures(cache=cache, coords=coords, raw=torch.stack(raw), seconds=time.perf_counter() - start)


def _autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch_dtype(dtype))


def _fit_cache_dtype(cache: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The cache, switched to float32 if these tokens overflow its float16."""
    if cache.dtype == torch.float16 and tokens.abs().amax() > torch.finfo(torch.float16).max:
        warnings.warn("raw features overflow float16; caching them in float32 "
                      "(cache_dtype='float32' avoids this check)", stacklevel=2)
        return cache.float()
    return cache


def _device_of(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_image(generators: list[torch.Generator], draw) -> nn.Parameter:
    """A parameter (B, ...) whose slice b is ``draw(generators[b])``."""
    return nn.Parameter(torch.stack([draw(generator) for generator in generators]))


def _per_image_uniform(generators: list[torch.Generator], shape: tuple[int, ...], bound: float) -> nn.Parameter:
    """A parameter (B, *shape) whose slice b is uniform in [-bound, bound], drawn from generators[b]."""
    return _per_image(generators, lambda g: (torch.rand(*shape, generator=g) * 2 - 1) * bound)


class BatchedMLP(nn.Module):
    """One MLP per image (Linear -> ReLU -> ... -> Linear), all applied with batched matmuls:
    (B, N, sizes[0]) -> (B, N, sizes[-1]). nn.Linear's default initialisation, image b's drawn
    from generators[b]."""

    def __init__(self, sizes: list[int], generators: list[torch.Generator]):
        super().__init__()
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in zip(sizes, sizes[1:]):
            bound = 1 / math.sqrt(fan_in)
            self.weights.append(_per_image_uniform(generators, (fan_in, fan_out), bound))
            self.biases.append(_per_image_uniform(generators, (1, fan_out), bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(bias, x, weight)
            if i < len(self.weights) - 1:
                x = torch.relu(x)
        return x


class Fields(nn.Module):
    """F, G and h of B images: F = MLP(grid encoding), 128 -> C/2 -> C; G (B, K*K, C) ~ N(0, std^2);
    h = MLP C -> C/4 -> C/4 -> C on the raw feature. Image b's are initialised from generators[b]."""

    def __init__(self, channels: int, grid: int, config: DecomposeConfig, generators: list[torch.Generator]):
        super().__init__()
        if channels < 4:
            raise ValueError(f"features need at least 4 channels (h has C/4 hidden units), got {channels}")
        self.encoding = config.encoding
        self.table = _per_image(generators, lambda g: self.encoding.init_table(1, g)[0])
        self.field = BatchedMLP([self.encoding.output_dim, channels // 2, channels], generators)
        std = config.artifact_std
        self.artifact = _per_image(generators, lambda g: torch.randn(grid * grid, channels, generator=g) * std)
        self.residual = BatchedMLP([channels, channels // 4, channels // 4, channels], generators)

    def clean(self, coords: torch.Tensor, encode: Implementation) -> torch.Tensor:
        """F at these coordinates (B, N, 2), through the grid encoding ``encode``."""
        return self.field(encode(coords, self.table, self.encoding))


def decomposition_loss(clean: torch.Tensor, artifact: torch.Tensor, raw: torch.Tensor,
                       residual: torch.Tensor | None = None, residual_weight: float = 0.1,
                       sparsity_weight: float = 0.02) -> torch.Tensor:
    """Per-image loss (B,) on (B, N, C) tokens ("DVT stage 1" in docs/method.md): with pred = F + G
    (+ stopgrad(h) in phase 2), mse(pred, raw) + (1 - mean cos(pred, raw)), and in phase 2
    + residual_weight * mse(h, stopgrad(raw - F - G)) + sparsity_weight * mean|h|."""
    field_part = clean + artifact
    prediction = field_part if residual is None else field_part + residual.detach()
    loss = (prediction - raw).square().mean((1, 2)) + 1 - F.cosine_similarity(prediction, raw, dim=-1).mean(1)
    if residual is not None:
        target = (raw - field_part).detach()
        loss = (loss + residual_weight * (residual - target).square().mean((1, 2))
                + sparsity_weight * residual.abs().mean((1, 2)))
    return loss


def fit_decomposition(features: ViewFeatures, config: DecomposeConfig, seed: int | Sequence[int] = 0,
                      impl: str = "auto", progress: bool = False) -> list[Decomposition]:
    """Fits F, G and h of every image of ``features`` at once (config.iterations steps); image b's
    initialisation and token samples come from its seed (``seed``, or ``seed[b]``) alone."""
    cache, device = features.cache, features.cache.device
    images, tokens, channels = cache.shape
    grid = features.raw.shape[-1]
    tokens_per_view = grid * grid
    start = time.perf_counter()
    seeds = per_image_seeds(seed, images)
    fields = Fields(channels, grid, config, [torch.Generator().manual_seed(s) for s in seeds]).to(device)
    # the encoding, chosen once: every step's inputs have the same dtype and device
    encode = choose_encoding(features.coords[:, :1], fields.table, config.encoding, impl)
    optimizer = torch.optim.Adam(fields.parameters(), lr=config.lr, betas=config.betas, eps=config.eps,
                                 weight_decay=config.weight_decay, fused=device.type == "cuda" or None)
    samplers = [torch.Generator(device).manual_seed(s) for s in seeds]
    image_rows = torch.arange(images, device=device)[:, None] * tokens
    artifact_rows = torch.arange(images, device=device)[:, None] * tokens_per_view
    flat_cache, flat_coords = cache.view(-1, channels), features.coords.view(-1, 2)
    losses = torch.empty(config.iterations, images, device=device)
    count = config.tokens_per_step
    for step in tqdm(range(config.iterations), desc="DVT fit", unit="step", disable=not progress, leave=False):
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate(step)
        phase_two = step >= config.iterations // 2  # G frozen, h on
        if step % DRAW_BLOCK == 0:  # each image's token samples for the next DRAW_BLOCK steps, from its own generator
            draws = torch.stack([torch.randint(tokens, (DRAW_BLOCK, count), generator=g, device=device)
                                 for g in samplers], 1)
        index = draws[step % DRAW_BLOCK]  # (B, count)
        rows = (index + image_rows).view(-1)
        raw = flat_cache.index_select(0, rows).view(images, count, channels).float()
        coords = flat_coords.index_select(0, rows).view(images, count, 2)
        artifact_table = fields.artifact.detach() if phase_two else fields.artifact
        positions = (index % tokens_per_view + artifact_rows).view(-1)
        artifact = artifact_table.view(-1, channels).index_select(0, positions).view(images, count, channels)
        residual = fields.residual(raw) if phase_two else None
        loss = decomposition_loss(fields.clean(coords, encode), artifact, raw, residual, config.residual_weight,
                                  config.sparsity_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
        losses[step] = loss.detach()
    with torch.no_grad():
        raw = features.raw.flatten(2).transpose(1, 2)  # (B, K*K, C)
        maps = {
            "clean": fields.clean(features.coords[:, :tokens_per_view].contiguous(), encode),
            "artifact": fields.artifact,
            "residual": fields.residual(raw),
        }
        maps = {name: value.transpose(1, 2).reshape(images, channels, grid, grid).float().cpu()
                for name, value in maps.items()}
    losses = losses.cpu()
    seconds = {"features": features.seconds / images, "fit": (time.perf_counter() - start) / images}
    return [
        Decomposition(raw=features.raw[b].cpu(), clean=maps["clean"][b], artifact=maps["artifact"][b],
                      residual=maps["residual"][b], losses=losses[:, b], seconds=dict(seconds), encoding=encode.name)
        for b in range(images)
    ]
