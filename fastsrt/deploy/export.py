"""Export to ONNX at a fixed token grid / image size with a dynamic batch axis.

timm's ``dynamic_img_size`` resamples the ViT's positional embedding with an antialiased bicubic
resize that neither ONNX nor TensorRT accepts (docs/traps.md), and the denoiser resamples
its own the same way at other grids. So the size is fixed before export: the denoiser through
``Denoiser.at_grid``, the ViT through timm's ``set_input_size`` (``fixed_size_model``); the
exported graphs then only add a constant positional embedding.
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from fastsrt.backbone import Backbone, as_backbone, model_name
from fastsrt.dvt.denoiser import Denoiser, same_backbone
from fastsrt.errors import Unavailable
from fastsrt.io import atomic_path


def fixed_size_model(model: nn.Module, image_size: tuple[int, int]) -> nn.Module:
    """A copy of a timm ViT that takes only ``image_size`` images, its positional embedding
    resampled once (timm's set_input_size), the dynamic-size path switched off. Checked against
    the original on a random image."""
    if not hasattr(model, "set_input_size"):  # a timm model of another family: the value, not its type, is wrong
        raise ValueError(f"{type(model).__name__} has no set_input_size; cannot fix its input size for export")
    fixed = copy.deepcopy(model).eval()
    fixed.set_input_size(img_size=tuple(image_size))
    if getattr(fixed, "dynamic_img_size", False):
        fixed.dynamic_img_size = False
        fixed.patch_embed.flatten = True  # the dynamic path had it emit (B, h, w, C) grids
    parameter = next(model.parameters())
    probe = torch.randn(1, model.patch_embed.proj.in_channels, *image_size, device=parameter.device,
                        dtype=parameter.dtype)
    with torch.no_grad():
        expected, actual = model.forward_features(probe), fixed.forward_features(probe)
    if actual.shape != expected.shape or not torch.allclose(actual, expected, rtol=1e-4, atol=1e-4):
        raise ValueError(f"fixing {type(model).__name__} to {image_size} changes its output; export it at its own size")
    return fixed


class FixedSizePipeline(nn.Module):
    """ViT + denoiser at one image size: images (B, 3, H, W), normalised -> clean (B, C, h, w).
    Built for export; eager use gives the same numbers as fastsrt.DVT at that size."""

    def __init__(self, model, denoiser: Denoiser, image_size, layer: int | None = None):
        super().__init__()
        backbone = as_backbone(model)
        if not isinstance(backbone, Backbone):
            raise TypeError("the ViT + denoiser export needs a timm ViT")
        if not same_backbone(denoiser.backbone, model_name(backbone)) or denoiser.dim != backbone.embed_dim:
            raise ValueError(f"the denoiser ({denoiser.backbone}, {denoiser.dim} channels) does not belong to "
                             f"{model_name(backbone)} ({backbone.embed_dim} channels)")
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        patch = backbone.patch_size
        if size[0] % patch or size[1] % patch:
            raise ValueError(f"image size {size} is not a multiple of the patch size {patch}")
        self.image_size, self.grid = size, (size[0] // patch, size[1] // patch)
        self.layer = backbone.layer_indices(denoiser.layer if layer is None else layer)[0]
        self.model = fixed_size_model(backbone.model, size)
        self.denoiser = denoiser.at_grid(self.grid)
        self.config = {"image_size": list(size), "layer": self.layer, "model": type(self.model).__name__,
                       "denoiser": self.denoiser.config}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_intermediates(images, indices=[self.layer], norm=True, output_fmt="NCHW",
                                                  intermediates_only=True)[0]
        return self.denoiser(tokens)


def require_onnx_export() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise Unavailable(f"ONNX export needs onnx and onnxscript ({error.name} is not installed): "
                          "pip install onnx onnxscript (or fastsrt[onnx])") from None


# Opset 18: the lowest torch's ONNX exporter writes without converting. GELU is then Erf arithmetic
# (the Gelu node is opset 20, which older TensorRT parsers lack) and LayerNormalization (opset 17,
# parsed by TensorRT >= 8.6) stays one node; TensorRT 10 parses opsets 9 to 20.
OPSET = 18


def export_onnx(module: nn.Module, input_shape, path: str | os.PathLike, max_batch: int = 64) -> Path:
    """Writes ``module`` as ONNX (atomically, opset ``OPSET``): input "input" (B, *input_shape)
    float32 with a dynamic batch axis, output "output". The module must have a fixed size (see above)."""
    require_onnx_export()
    path = Path(path)
    parameter = next(module.parameters())
    if any(p.dtype != torch.float32 for p in module.parameters()):
        raise ValueError("export a float32 module; fp16/bf16 are the runtimes' precision options")
    example = torch.randn(2, *input_shape, device=parameter.device, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch))
    with atomic_path(path) as temporary, torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)  # torch-internal noise
        torch.onnx.export(module.eval(), (example,), str(temporary), dynamo=True, opset_version=OPSET,
                          dynamic_shapes=({0: batch},), input_names=["input"], output_names=["output"],
                          external_data=False, verbose=False)
    return path
