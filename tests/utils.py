"""Helpers shared by the tests (conftest.py holds only the session's settings and fixtures)."""
import pytest
import timm
import torch
import torch.nn.functional as F

import fastsrt  # noqa: F401  (makes torchvision, hence timm, importable on a CPU-only torch)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_vit(name: str = "vit_small_patch14_dinov2", depth: int = 2, embed_dim: int = 48, seed: int = 0, **kwargs):
    """A small random timm ViT of the given family, in eval mode, taking any image size."""
    torch.manual_seed(seed)
    kwargs.setdefault("dynamic_img_size", True)
    model = timm.create_model(name, pretrained=False, depth=depth, embed_dim=embed_dim, num_heads=2, **kwargs)
    return model.eval()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def shifted_by_padding(image, dy, dx, mode):
    """Independent view: pad by the shift with F.pad's own modes, then crop back to the image."""
    height, width = image.shape[-2:]
    pads = (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0))
    padded = F.pad(image, pads, mode="constant" if mode == "zeros" else mode)
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + height, left : left + width]
