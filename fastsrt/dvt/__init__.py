"""DVT, Denoising Vision Transformers (Yang et al., ECCV 2024): stage 1, the per-image
neural-field decomposition; stage 2, the distilled one-block denoiser."""
from fastsrt.dvt.decomposition import DecomposeConfig, Decomposition, decompose
from fastsrt.dvt.denoiser import Denoiser
from fastsrt.dvt.pipeline import DVT
from fastsrt.dvt.pretrained import distilled_backbone, load_distilled
from fastsrt.dvt.runner import fit_folder, iter_pairs, load_pair
from fastsrt.dvt.train import PairFolder, SRTTargets, TrainConfig, TrainResult, denoiser_loss, train_denoiser
from fastsrt.ops.grid_encoding import GridEncodingConfig, grid_encode

__all__ = [
    "DVT",
    "DecomposeConfig",
    "Decomposition",
    "Denoiser",
    "GridEncodingConfig",
    "PairFolder",
    "SRTTargets",
    "TrainConfig",
    "TrainResult",
    "decompose",
    "denoiser_loss",
    "distilled_backbone",
    "fit_folder",
    "grid_encode",
    "iter_pairs",
    "load_distilled",
    "load_pair",
    "train_denoiser",
]
