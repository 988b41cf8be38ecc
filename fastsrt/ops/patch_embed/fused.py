"""The launch of the fused shift + patch-embedding kernel (kernels.py), imported on first use."""
from __future__ import annotations

import torch

from fastsrt.errors import Unavailable
from fastsrt.ops import _triton
from fastsrt.options import DTYPE_NAMES, PADDINGS, torch_dtype

KERNELS = "fastsrt.ops.patch_embed.kernels"
OUT_DTYPES = tuple(torch_dtype(name) for name in DTYPE_NAMES)  # what the kernel writes: float32, bfloat16, float16


def shift_patch_embed_triton(
    images: torch.Tensor,
    shift_table: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_size: int,
    padding: str,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernel launch alone, for callers that validated the arguments (shift_patch_embed does):
    shift_table is a (K, 2) int32 tensor on the images' device, so that no host copy is needed
    (CUDA-graph capture). out: an optional contiguous (K*B, h, w, D) buffer of out_dtype to write.
    out_dtype also sets the multiply precision: bfloat16/float16 operands with float32
    accumulation, or exact float32 (no TF32). Raises ``Unavailable`` where the kernel cannot run."""
    batch, channels, height, width = images.shape
    dim = weight.shape[0]
    h, w = height // patch_size, width // patch_size
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"the fused patch embedding writes float32, bfloat16 or float16, not {out_dtype}")
    weight_matrix = weight.reshape(dim, channels * patch_size * patch_size)  # a view of a contiguous conv weight
    shape = (shift_table.shape[0] * batch, h, w, dim)
    if out is None:
        out = torch.empty(shape, device=images.device, dtype=out_dtype)
    elif tuple(out.shape) != shape or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {shape} {out_dtype} tensor, got {tuple(out.shape)} {out.dtype}")
    reasons = _triton.not_supported_reasons(images.device)
    if reasons:
        raise Unavailable(f"the Triton shift+patch-embedding kernel cannot run on this {images.device.type} tensor: "
                          f"{'; '.join(reasons)}")
    kernels = _triton.kernels(KERNELS)
    tl = kernels.tl
    interpreted = _triton.interpreting()
    rows = out.shape[0] * h * w
    # the multiply's operand type: the output's, except float32 in the interpreter, whose low-precision
    # tl.dot is wrong and whose casts to bfloat16 truncate instead of rounding (docs/traps.md)
    operand = tl.float32 if interpreted else {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                                               torch.float16: tl.float16}[out_dtype]
    # fixed tiles (the interpreter cannot autotune): big ones there (~1 ms per program); on a GPU, the
    # largest that compile without register spills for its architecture (kernels.gpu_tiles)
    if interpreted:
        block_m, block_n, block_k, warps = 64, 64, 64, 4
    else:
        major = torch.cuda.get_device_capability(images.device)[0]
        block_m, block_n, block_k, warps = kernels.gpu_tiles(operand, major)
    grid = (-(-rows // block_m), -(-dim // block_n))  # rows on axis 0 (up to 2^31 - 1 programs)
    with _triton.on_device(images):
        kernels.shift_patch_embed_kernel[grid](
            images, shift_table, weight_matrix, bias if bias is not None else weight_matrix, out,
            batch, height, width, w, h * w, rows, weight_matrix.shape[1], dim,
            *images.stride(), *weight_matrix.stride(),
            PATCH=patch_size, PADDING=PADDINGS.index(padding), HAS_BIAS=bias is not None, OPERAND=operand,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        )
    return out
