"""DVT stage 2: the distilled denoiser (docs/method.md, "DVT stage 2").

One standard ViT block (or N of them) on the backbone's final normed patch tokens, after adding a
learnable positional embedding (1, h*w, C) that is resampled to other token grids with timm's
``resample_abs_pos_embed`` defaults (bicubic, antialiased):

    out = Block(x + pos_embed)        x: the (B, h*w, C) patch tokens; no extra norm after

Parameter names follow the authors' released checkpoints: ``denoiser.<timm Block names>`` for one
block, ``denoiser.<i>.<names>`` for several, and ``pos_embed``. fastsrt saves its own denoisers as
safetensors (the same names) with a JSON config in the file's metadata and beside it.
"""
from __future__ import annotations

import json
import os
import warnings
from functools import partial
from pathlib import Path

import torch
from torch import nn

from fastsrt._torchvision_compat import ensure_torchvision_imports
from fastsrt.checks import check_matches_model
from fastsrt.dvt.pretrained import download, release_file
from fastsrt.io import load_metadata, load_tensors, save_json, save_tensors

ensure_torchvision_imports()
from timm.layers import Mlp, resample_abs_pos_embed  # noqa: E402
from timm.models import is_model, split_model_name_tag  # noqa: E402
from timm.models.vision_transformer import Block  # noqa: E402

FORMAT = "fastsrt.denoiser"
CONFIG_KEYS = ("dim", "grid", "num_blocks", "num_heads", "pos_embed", "backbone", "layer")


def check_token_grid(tokens, channels: int, weights: torch.Tensor | None = None) -> None:
    """Token grids for a denoiser of ``channels`` features: a floating (B, channels, h, w) tensor,
    B >= 1, matching the denoiser's ``weights`` (``check_matches_model``). Their values are not
    inspected: that would wait for the GPU at every call, and cannot run inside a CUDA graph."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor of shape (B, C, h, w), got {type(tokens).__name__}")
    if tokens.dim() != 4:
        raise ValueError(f"tokens must have shape (B, C, h, w), got shape {tuple(tokens.shape)}")
    if tokens.shape[1] != channels:
        raise ValueError(
            f"this denoiser takes {channels}-channel tokens, got shape {tuple(tokens.shape)} "
            f"({tokens.shape[1]} channels): was it trained for another backbone?"
        )
    if not tokens.is_floating_point():
        raise TypeError(f"tokens must be floating point, got dtype {tokens.dtype}")
    if tokens.shape[0] == 0:
        raise ValueError(f"tokens is an empty batch (shape {tuple(tokens.shape)}): pass at least one token grid")
    if weights is not None:
        check_matches_model("tokens", tokens, weights)


def timm_name(name) -> str | None:
    """``name`` if it names a timm model ("architecture" or "architecture.tag"), else None."""
    return name if isinstance(name, str) and is_model(split_model_name_tag(name)[0]) else None


def same_backbone(a: str | None, b: str | None) -> bool:
    """Names match when they are equal, or when one has no pretrained tag and the architectures agree."""
    if a is None or b is None:
        return True
    (arch_a, tag_a), (arch_b, tag_b) = split_model_name_tag(a), split_model_name_tag(b)
    return arch_a == arch_b and (not tag_a or not tag_b or tag_a == tag_b)


def _pair(grid) -> tuple[int, int]:
    pair = (grid, grid) if isinstance(grid, int) else tuple(int(v) for v in grid)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"grid must be a positive int or an (h, w) pair, got {grid!r}")
    return pair


class Denoiser(nn.Module):
    """The DVT denoiser: (B, C, h, w) raw token grids -> (B, C, h, w) clean ones.

    Args:
        dim: feature channels C of the backbone.
        grid: (h, w) token grid it is trained on (37 x 37 = 518 px at patch 14 in the paper);
            other grids resample the positional embedding.
        num_blocks: transformer blocks (the paper uses 1).
        num_heads: attention heads (default C / 64, as the authors).
        pos_embed: False drops the positional embedding (the authors' ``enable_pe=False``).
        backbone, layer: what the denoiser was trained on (recorded, and checked by fastsrt.DVT).
    """

    def __init__(self, dim: int, grid=(37, 37), num_blocks: int = 1, num_heads: int | None = None,
                 pos_embed: bool = True, backbone: str | None = None, layer: int = -1):
        super().__init__()
        num_heads = num_heads or max(1, dim // 64)
        if dim < 1 or dim % num_heads:
            raise ValueError(f"dim={dim} must be a positive multiple of num_heads={num_heads}")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.dim, self.grid, self.num_blocks, self.num_heads = int(dim), _pair(grid), int(num_blocks), int(num_heads)
        self.backbone, self.layer = backbone, int(layer)
        make_block = partial(Block, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, act_layer=nn.GELU,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), mlp_layer=Mlp)
        self.denoiser = make_block() if num_blocks == 1 else nn.Sequential(*(make_block() for _ in range(num_blocks)))
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid[0] * self.grid[1], dim) * 0.02) if pos_embed else None

    @property
    def config(self) -> dict:
        return {"dim": self.dim, "grid": list(self.grid), "num_blocks": self.num_blocks, "num_heads": self.num_heads,
                "pos_embed": self.pos_embed is not None, "backbone": self.backbone, "layer": self.layer}

    def pos_embed_at(self, grid: tuple[int, int]) -> torch.Tensor:
        """The positional embedding (1, h*w, C) for an (h, w) grid: the trained one, or resampled."""
        if tuple(grid) == self.grid:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, new_size=list(grid), old_size=list(self.grid),
                                      num_prefix_tokens=0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        check_token_grid(tokens, self.dim, next(self.parameters()))
        batch, channels, height, width = tokens.shape
        x = tokens.flatten(2).transpose(1, 2)  # (B, h*w, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed_at((height, width)).to(x.dtype)
        x = self.denoiser(x)
        return x.transpose(1, 2).reshape(batch, channels, height, width)

    def at_grid(self, grid) -> Denoiser:
        """A copy whose trained grid is ``grid``: the positional embedding resampled once, so that its forward
        at that grid is a plain addition (what a fixed-size ONNX / TensorRT export needs)."""
        grid = _pair(grid)
        parameter = next(self.parameters())
        fixed = Denoiser(**{**self.config, "grid": grid}).to(parameter.device, parameter.dtype)
        state = self.state_dict()
        if self.pos_embed is not None:
            with torch.no_grad():
                state["pos_embed"] = self.pos_embed_at(grid).detach().clone()
        fixed.load_state_dict(state)
        return fixed.train(self.training)

    # ----- files -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Writes PATH (.safetensors; weights under the authors' names, the config in its metadata)
        and the config as JSON beside it (PATH with suffix .json). Both writes are atomic."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"denoiser files end in .safetensors, got {str(path)!r}")
        save_json(path.with_suffix(".json"), {"format": FORMAT, **self.config})
        save_tensors(path, self.state_dict(), {"format": FORMAT, "config": self.config})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, backbone: str | None = None, grid=None) -> Denoiser:
        """A denoiser from fastsrt's safetensors file or the authors' released checkpoint (.pth: a
        dict whose "denoiser" entry holds ``denoiser.*`` and ``pos_embed``); dim, block count and
        grid are inferred from the weights. ``backbone`` (a timm name) raises a ValueError if the
        file says it belongs to another backbone; ``grid`` is needed only for a non-square
        positional embedding without a config."""
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"{str(path)!r} is a folder, not a denoiser checkpoint (.safetensors or .pth)")
        if not path.is_file():
            raise FileNotFoundError(f"no such denoiser checkpoint: {str(path)!r}")
        if path.suffix == ".safetensors":
            state, config = _read_fastsrt(path)
        else:
            state, config = _read_authors(path)
        config = {**_infer_config(state, path, grid), **{k: v for k, v in config.items() if k in CONFIG_KEYS}}
        if config.get("grid") is None:
            if config["pos_embed"]:
                raise ValueError(f"{str(path)!r}: the positional embedding is not square; pass grid=(h, w)")
            config.pop("grid", None)
        if not same_backbone(config.get("backbone"), backbone):
            raise ValueError(f"{str(path)!r} is a denoiser for {config['backbone']}, not for {backbone}")
        if backbone and not config.get("backbone"):
            config["backbone"] = backbone
        denoiser = cls(**config)
        try:
            denoiser.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"{str(path)!r} does not hold a denoiser of this shape: {error}") from None
        return denoiser.eval()

    @classmethod
    def from_pretrained(cls, name: str, variant: str | None = None, force_download: bool = False) -> Denoiser:
        """The DVT authors' released denoiser for the timm backbone ``name`` (e.g.
        "vit_base_patch14_dinov2.lvd142m"), trained on ImageNet-1k (``variant="imagenet"``) or PASCAL
        VOC ("voc"); None takes the ImageNet one where it was released, else the VOC one. Downloaded
        into the Hugging Face cache, or read from it offline (``fastsrt.dvt.pretrained``, which lists
        the released names)."""
        path = download(release_file(name, "denoiser", variant), force_download=force_download)
        return cls.load(path, backbone=name)


def _read_fastsrt(path: Path) -> tuple[dict, dict]:
    try:
        metadata = load_metadata(path)
        state = load_tensors(path)
    except Exception as error:  # safetensors raises several types for a damaged file
        raise ValueError(f"cannot read denoiser {str(path)!r}: {error}") from None
    if isinstance(metadata.get("config"), dict):
        return state, metadata["config"]
    sidecar = path.with_suffix(".json")
    return state, (json.loads(sidecar.read_text()) if sidecar.is_file() else {})


def _read_authors(path: Path) -> tuple[dict, dict]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors all mean "not a checkpoint"
        raise ValueError(f"cannot read denoiser checkpoint {str(path)!r}: {error}") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    state = checkpoint.get("denoiser", checkpoint)
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    dropped = sorted({k.split(".")[0] for k in state if not (k == "pos_embed" or k.startswith("denoiser."))})
    if dropped:  # e.g. the ViT itself ("vit.*") in a full training checkpoint
        warnings.warn(f"{path.name}: ignoring entries other than the denoiser: {', '.join(dropped)}", stacklevel=3)
    state = {k: v for k, v in state.items() if k == "pos_embed" or k.startswith("denoiser.")}
    # the released files are named after their backbone, e.g. vit_base_patch14_dinov2.lvd142m.pth
    return state, ({"backbone": path.stem} if is_model(path.stem) else {})


def _infer_config(state: dict, path: Path, grid) -> dict:
    norms = [k for k in state if k.startswith("denoiser.") and k.endswith("norm1.weight")]
    if not norms:
        raise ValueError(f"{str(path)!r} holds no denoiser weights (no 'denoiser.*norm1.weight' entry)")
    config = {"dim": state[norms[0]].shape[0], "num_blocks": len(norms), "pos_embed": "pos_embed" in state}
    if "pos_embed" in state:
        tokens = state["pos_embed"].shape[1]
        side = round(tokens**0.5)
        if grid is not None:
            config["grid"] = _pair(grid)
        elif side * side == tokens:
            config["grid"] = (side, side)
        else:
            config["grid"] = None  # only a config can say
    elif grid is not None:
        config["grid"] = _pair(grid)
    return config

