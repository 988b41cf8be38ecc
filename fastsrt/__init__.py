"""fastsrt: fine-grained, clean Vision Transformer features (SRT and DVT), fast."""
from fastsrt.backbone import Backbone, BackboneOutput, CallableBackbone, load_timm_model
from fastsrt.dvt.pipeline import DVT
from fastsrt.srt import SRT, SRTOutput
from fastsrt.views import as_shifts, grid, paper_grid, random_shifts

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "BackboneOutput",
    "CallableBackbone",
    "DVT",
    "SRT",
    "SRTOutput",
    "as_shifts",
    "grid",
    "load_timm_model",
    "paper_grid",
    "random_shifts",
]
