"""Make ``import torchvision`` (and so ``import timm``) work on a CPU-only torch.

The torchvision wheel that pip pairs with torch 2.13 is a CUDA build. On the CPU torch its
compiled ops library fails to load, and torchvision's own fake-tensor registrations then crash
the import with "operator torchvision::nms does not exist" (docs/traps.md). When that happens,
defining the two operator schemas that torchvision registers unconditionally and importing it
again lets the import finish; the ops themselves stay unavailable, which nothing in fastsrt or
timm's ViTs needs. Where torchvision imports as it is, this does nothing.

``ensure_torchvision_imports`` imports nothing itself (``import fastsrt`` stays free of torch): it
puts a finder first on ``sys.meta_path`` that, at the first ``import torchvision``, wraps
torchvision's loader with that retry.
"""
import importlib.abc
import importlib.util
import sys

_MISSING_OPS = ("nms", "qnms")
_library = None  # the torch.library.Library holding the schemas must stay alive


def _define_missing_schemas() -> None:
    global _library
    import torch

    _library = torch.library.Library("torchvision", "DEF")
    for op in _MISSING_OPS:
        _library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


class _RetryWithSchemas(importlib.abc.Loader):
    """torchvision's own loader, run a second time after defining the schemas when its first run
    fails for want of them."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # get_resource_reader, is_package, ...: the wrapped loader's
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        try:
            self.loader.exec_module(module)
        except RuntimeError as error:
            if "torchvision::nms" not in str(error):
                raise
            for name in [m for m in sys.modules if m.startswith("torchvision.")]:
                del sys.modules[name]  # drop the half-imported subpackages before trying again
            _define_missing_schemas()
            self.loader.exec_module(module)


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)  # once: the other finders locate torchvision itself
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RetryWithSchemas(spec.loader)
        return spec


def ensure_torchvision_imports() -> None:
    """Lets the first ``import torchvision`` in this process finish on a CPU-only torch."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())
