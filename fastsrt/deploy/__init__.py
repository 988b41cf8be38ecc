"""Deployment of the DVT denoiser: ONNX export at a fixed grid, TensorRT engines (cached on disk),
torch.compile + CUDA graphs, ONNX Runtime; ``compile`` picks the best backend available."""
from fastsrt.deploy.backends import choose_backend
from fastsrt.deploy.cache import cache_key, default_cache_dir, module_hash
from fastsrt.deploy.export import FixedSizePipeline, export_onnx, fixed_size_model
from fastsrt.deploy.runtime import CompiledModule, compile, compile_module, compile_pipeline
from fastsrt.options import BACKENDS

__all__ = [
    "BACKENDS",
    "CompiledModule",
    "FixedSizePipeline",
    "cache_key",
    "choose_backend",
    "compile",
    "compile_module",
    "compile_pipeline",
    "default_cache_dir",
    "export_onnx",
    "fixed_size_model",
    "module_hash",
]
