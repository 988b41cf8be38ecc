"""DVT's 2-D multi-resolution hash-grid encoding: the torch reference (reference.py, the
semantics), the C++/CUDA extension with its loader and autograd (extension.py), and the choice
between them (dispatch.py)."""
from fastsrt.ops.grid_encoding.dispatch import IMPLEMENTATIONS, check_encoding_inputs, choose_encoding, grid_encode
from fastsrt.ops.grid_encoding.extension import grid_encode_extension, load_extension
from fastsrt.ops.grid_encoding.reference import GridEncodingConfig, grid_encode_reference

__all__ = [
    "IMPLEMENTATIONS",
    "GridEncodingConfig",
    "check_encoding_inputs",
    "choose_encoding",
    "grid_encode",
    "grid_encode_extension",
    "grid_encode_reference",
    "load_extension",
]
