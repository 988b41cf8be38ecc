import os

import torch

# Triton kernels run on a machine without a GPU only in the interpreter, which must be chosen
# before any kernel is defined (shared/REFERENCE.md, traps).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# float32 parity on a GPU: cuDNN and cuBLAS would otherwise round inputs to TF32 (~3e-4 relative)
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

import pytest  # noqa: E402

import fastsrt  # noqa: E402,F401  (makes torchvision, hence timm, importable on a CPU-only torch)
import timm  # noqa: E402

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


@pytest.fixture(scope="session")
def extension():
    """fastsrt's compiled grid-encoding extension (built once, cached); skips where no C++ compiler exists."""
    import shutil

    from fastsrt.dvt.extension import load_extension

    module = load_extension()
    if module is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler here: the extension cannot be built")
    assert module is not None, "the extension failed to build (see the warning)"
    return module
