"""fastsrt: fine-grained, clean Vision Transformer features (SRT and DVT), fast.

The public names below are imported on first use, so that ``import fastsrt`` (and the ``fastsrt``
command's ``--help``, which takes its choices from the torch-free ``fastsrt.options``) does not
import torch. Importing fastsrt before timm still makes timm importable on a CPU-only torch
(``fastsrt._torchvision_compat``).
"""
import importlib
import importlib.util

from fastsrt._torchvision_compat import ensure_torchvision_imports

__version__ = "0.1.0"

_PUBLIC = {  # name -> the module that defines it
    "Backbone": "fastsrt.backbone",
    "BackboneOutput": "fastsrt.backbone",
    "CallableBackbone": "fastsrt.backbone",
    "DVT": "fastsrt.dvt.pipeline",
    "SRT": "fastsrt.srt",
    "SRTOutput": "fastsrt.srt",
    "anytime_order": "fastsrt.views",
    "as_shifts": "fastsrt.views",
    "grid": "fastsrt.views",
    "load_timm_model": "fastsrt.backbone",
    "paper_grid": "fastsrt.views",
    "random_shifts": "fastsrt.views",
    "stream": "fastsrt.streaming",  # a module of another name: ``import fastsrt.stream`` would rebind the name
}
__all__ = sorted(_PUBLIC)

ensure_torchvision_imports()


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a subpackage: fastsrt.dvt, fastsrt.ops...
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
