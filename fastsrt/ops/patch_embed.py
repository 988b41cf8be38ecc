"""Shift + patchify + patch-embedding projection of every SRT view in one pass.

For view k (shift (dy, dx)) of image b, token (ty, tx) and embedding channel d:
    E[k*B + b, ty, tx, d] = bias[d] + sum_{c, py, px} weight[d, c, py, px] * V_k[b, c, ty*p + py, tx*p + px]
where V_k = shift_images(images, [shifts[k]], padding) (fastsrt.ops.shift). That is a timm patch
embedding that is a plain strided convolution (kernel = stride = p, no norm) applied to the shifted
views, written as the matrix product  patches (K*B*h*w, C*p*p) @ weight.reshape(D, C*p*p)^T.

The Triton kernel gathers each patch's pixels straight from the unshifted images, resolving the
padding per pixel, and multiplies them with the weight tile in registers: neither the K shifted
images nor the unfolded patches are ever stored. Output rows are view-major like shift_images.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastsrt.checks import check_choice, check_images
from fastsrt.ops import _triton

from fastsrt.ops.shift import PADDINGS, check_shifts_fit, shift_images

IMPLS = ("auto", "reference", "fused")
FALLBACK = "the fused shift+patch-embedding runs as its torch reference"


def plain_conv_weights(patch_embed: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | str:
    """(weight (D, C, p, p), bias (D,) or None) of a timm PatchEmbed that is a plain strided
    convolution without norm, else the reason it is not (a string)."""
    from timm.layers import PatchEmbed

    if type(patch_embed) is not PatchEmbed:
        return f"its patch embedding is a {type(patch_embed).__name__}, not a plain timm PatchEmbed"
    proj = patch_embed.proj
    if type(proj) is not nn.Conv2d:
        return f"its patch projection is a {type(proj).__name__}, not an nn.Conv2d"
    if not isinstance(patch_embed.norm, nn.Identity):
        return f"its patch embedding has a {type(patch_embed.norm).__name__} after the projection"
    kernel = tuple(proj.kernel_size)
    if kernel[0] != kernel[1] or tuple(proj.stride) != kernel or tuple(proj.padding) != (0, 0) \
            or tuple(proj.dilation) != (1, 1) or proj.groups != 1:
        return (f"its patch projection is not a plain strided convolution (kernel {kernel}, stride "
                f"{tuple(proj.stride)}, padding {proj.padding}, dilation {proj.dilation}, groups {proj.groups})")
    return proj.weight, proj.bias


def check_patch_embed_args(images, shifts, weight, bias, patch_size, padding, impl) -> None:
    check_choice("padding", padding, PADDINGS)
    check_choice("impl", impl, IMPLS)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or tuple(weight.shape[-2:]) != (patch_size, patch_size):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must have shape (D, C, {patch_size}, {patch_size}), got {got}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_images(images, weight.shape[1], min_size=patch_size)
    height, width = images.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch_size}")
    if len(shifts) == 0:
        raise ValueError("shifts must hold at least one (dy, dx) pair")
    check_shifts_fit(shifts, height, width)


def shift_patch_embed_reference(
    images: torch.Tensor,
    shifts: Sequence[tuple[int, int]],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_size: int,
    padding: str = "zeros",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Patch embeddings of all views, (K*B, h, w, D), computed by materialising the shifted views
    and their unfolded patches. Computes in float32 at least (float64 stays float64)."""
    check_patch_embed_args(images, shifts, weight, bias, patch_size, padding, "reference")
    compute = torch.promote_types(images.dtype, torch.float32)
    views = shift_images(images.to(compute), shifts, padding)  # (K*B, C, H, W)
    h, w = views.shape[-2] // patch_size, views.shape[-1] // patch_size
    patches = F.unfold(views, patch_size, stride=patch_size).transpose(1, 2)  # (K*B, h*w, C*p*p), (c, py, px) order
    embeddings = patches @ weight.reshape(weight.shape[0], -1).to(compute).T
    if bias is not None:
        embeddings = embeddings + bias.to(compute)
    return embeddings.unflatten(1, (h, w)).to(out_dtype or images.dtype)


def shift_patch_embed(
    images: torch.Tensor,
    shifts: Sequence[tuple[int, int]],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_size: int,
    padding: str = "zeros",
    impl: str = "auto",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Patch embeddings (K*B, h, w, D) of the K shifted views of images (B, C, H, W), H and W
    multiples of patch_size; row k*B + b is image b shifted by shifts[k].

    impl: "fused" runs the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1;
    elsewhere it falls back to the reference with one warning), "reference" the torch path,
    "auto" the kernel on CUDA (the reference, with the same warning, where Triton is missing) and
    the reference otherwise. out_dtype (default: the images' dtype)
    also sets the kernel's multiply precision: bfloat16/float16 operands with float32
    accumulation, or exact float32 (no TF32).
    """
    check_patch_embed_args(images, shifts, weight, bias, patch_size, padding, impl)
    if impl == "auto":
        impl = "fused" if images.is_cuda else "reference"
    if impl == "fused" and not fused_runnable(images):
        impl = "reference"
    if impl == "reference":
        return shift_patch_embed_reference(images, shifts, weight, bias, patch_size, padding, out_dtype)
    shift_table = torch.tensor(shifts, dtype=torch.int32, device=images.device)
    return shift_patch_embed_triton(images, shift_table, weight, bias, patch_size, padding, out_dtype or images.dtype)


def fused_runnable(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernel can run on this tensor's device; warns once when it cannot."""
    return _triton.runnable(tensor, FALLBACK)


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
    Raises a RuntimeError where the kernel cannot run (see ``fused_runnable``)."""
    batch, channels, height, width = images.shape
    dim = weight.shape[0]
    h, w = height // patch_size, width // patch_size
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"the fused patch embedding writes float32, bfloat16 or float16, not {out_dtype}")
    weight_matrix = weight.reshape(dim, channels * patch_size * patch_size)  # a view of a contiguous conv weight
    shape = (shift_table.shape[0] * batch, h, w, dim)
    if out is None:
        out = torch.empty(shape, device=images.device, dtype=out_dtype)
    elif tuple(out.shape) != shape or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {shape} {out_dtype} tensor, got {tuple(out.shape)} {out.dtype}")
    triton = _triton.require(images, "the Triton shift+patch-embedding kernel")
    _triton.jit_kernels(globals(), _TRITON_FUNCTIONS)
    interpreted = _triton.interpreting()
    rows = out.shape[0] * h * w
    # the multiply's operand type: the output's, except float32 in the interpreter, whose low-precision
    # tl.dot is wrong and whose casts to bfloat16 truncate instead of rounding (REFERENCE.md traps)
    operand = tl.float32 if interpreted else {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[out_dtype]
    # fixed tiles (the interpreter cannot autotune): big ones there (~1 ms per program); on sm_90 these
    # compile without register spills (ptxas -v), tensor cores for 16-bit operands, FMA for float32
    if interpreted:
        block_m, block_n, block_k, warps = 64, 64, 64, 4
    elif operand == tl.float32:
        block_m, block_n, block_k, warps = 64, 128, 32, 8
    else:
        block_m, block_n, block_k, warps = 128, 128, 32, 8
    grid = (triton.cdiv(rows, block_m), triton.cdiv(dim, block_n))  # rows on axis 0 (up to 2^31 - 1 programs)
    with _triton.on_device(images):
        _shift_patch_embed_kernel[grid](
            images, shift_table, weight_matrix, bias if bias is not None else weight_matrix, out,
            batch, height, width, w, h * w, rows, weight_matrix.shape[1], dim,
            *images.stride(), *weight_matrix.stride(),
            PATCH=patch_size, PADDING=PADDINGS.index(padding), HAS_BIAS=bias is not None, OPERAND=operand,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        )
    return out


# The kernel is a plain function until _triton.jit_kernels wraps it on first use (tl is bound then).
tl = None
_TRITON_FUNCTIONS = ("_shift_patch_embed_kernel",)


def _shift_patch_embed_kernel(
    images_ptr, shifts_ptr, weight_ptr, bias_ptr, out_ptr,
    batch, height, width, grid_w, tokens_per_view, rows, reduce_size, dim,
    stride_ib, stride_ic, stride_iy, stride_ix, stride_wd, stride_wk,
    PATCH: tl.constexpr, PADDING: tl.constexpr, HAS_BIAS: tl.constexpr,
    OPERAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # one tile: BLOCK_M output rows (view-major image, token) x BLOCK_N embedding channels
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = row < rows
    col_ok = col < dim
    safe_row = tl.where(row_ok, row, 0)
    image = safe_row // tokens_per_view  # k * B + b
    token = safe_row % tokens_per_view
    view = image // batch
    dy = tl.load(shifts_ptr + 2 * view)
    dx = tl.load(shifts_ptr + 2 * view + 1)
    # source pixel of the patch's top-left corner: view(y, x) = image(y - dy, x - dx)
    top = (token // grid_w) * PATCH - dy
    left = (token % grid_w) * PATCH - dx
    image_base = (image % batch).to(tl.int64) * stride_ib

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, reduce_size, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)  # reduction index (c, py, px), as the conv weight's flattening
        k_ok = k < reduce_size
        safe_k = tl.where(k_ok, k, 0)
        channel = safe_k // (PATCH * PATCH)
        within = safe_k % (PATCH * PATCH)
        y = top[:, None] + (within // PATCH)[None, :]
        x = left[:, None] + (within % PATCH)[None, :]
        load_ok = row_ok[:, None] & k_ok[None, :]
        if PADDING == 0:  # zeros: outside pixels read as 0 (addresses clamped inside anyway)
            load_ok = load_ok & (y >= 0) & (y < height) & (x >= 0) & (x < width)
        if PADDING == 2:  # reflect about the border pixel; one reflection suffices as |shift| < size
            y = tl.where(y < 0, -y, tl.where(y >= height, 2 * (height - 1) - y, y))
            x = tl.where(x < 0, -x, tl.where(x >= width, 2 * (width - 1) - x, x))
        # replicate (and the clamp that keeps masked addresses in bounds)
        y = tl.minimum(tl.maximum(y, 0), height - 1)
        x = tl.minimum(tl.maximum(x, 0), width - 1)
        pixels = tl.load(
            images_ptr + image_base[:, None] + channel[None, :] * stride_ic + y * stride_iy + x * stride_ix,
            mask=load_ok, other=0.0,
        ).to(OPERAND)
        weights = tl.load(
            weight_ptr + col[None, :] * stride_wd + safe_k[:, None] * stride_wk,
            mask=k_ok[:, None] & col_ok[None, :], other=0.0,
        ).to(OPERAND)
        if OPERAND == tl.float32:  # exact float32 products, no TF32
            acc += tl.dot(pixels, weights, input_precision="ieee")
        else:
            acc += tl.dot(pixels, weights)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_offset = row.to(tl.int64)[:, None] * dim + col[None, :]
    tl.store(out_ptr + out_offset, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
