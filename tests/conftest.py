import os

import torch

# Triton kernels run on a machine without a GPU only in the interpreter, which must be chosen
# before any kernel is defined (docs/traps.md, "Triton").
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# float32 parity on a GPU: cuDNN and cuBLAS would otherwise round inputs to TF32 (~3e-4 relative)
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

import pytest  # noqa: E402

import fastsrt  # noqa: E402,F401  (makes torchvision, hence timm, importable on a CPU-only torch)


@pytest.fixture(scope="session")
def extension():
    """fastsrt's compiled grid-encoding extension (built once, cached); skips where no C++ compiler exists."""
    import shutil

    from fastsrt.ops.grid_encoding.extension import build_extension

    module, problem = build_extension()
    if module is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler here: the extension cannot be built")
    assert module is not None, f"the extension failed to build: {problem}"
    return module
