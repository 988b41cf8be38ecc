"""Make ``import torchvision`` (and so ``import timm``) work on a CPU-only torch.

The torchvision wheel that pip pairs with torch 2.13 is a CUDA build. On the CPU torch its
compiled ops library fails to load, and torchvision's own fake-tensor registrations then crash
the import with "operator torchvision::nms does not exist" (shared/REFERENCE.md, traps).
Defining the two operator schemas that torchvision registers unconditionally lets the import
finish; the ops themselves stay unavailable, which nothing in fastsrt or timm's ViTs needs.
Where torchvision imports as it is, this does nothing.
"""
import sys

import torch

_MISSING_OPS = ("nms", "qnms")
_library = None  # the torch.library.Library holding the schemas must stay alive


def ensure_torchvision_imports() -> None:
    global _library
    if "torchvision" in sys.modules:
        return
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        return  # not installed: timm reports that itself
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # drop the half-imported package before trying again
    _library = torch.library.Library("torchvision", "DEF")
    for op in _MISSING_OPS:
        _library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811
