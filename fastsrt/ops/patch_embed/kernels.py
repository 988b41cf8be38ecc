"""The Triton kernel of the fused shift + patchify + patch-embedding projection (see reference.py for
what it computes). A plain ``@triton.jit`` module: only ``fastsrt.ops._triton.kernels`` imports it,
when the fused path first runs.

The kernel gathers each patch's pixels straight from the unshifted images, resolving the padding per
pixel, and multiplies them with the weight tile in registers: neither the K shifted images nor the
unfolded patches are ever stored. Output rows are view-major like ``shift_images``.
"""
import triton
import triton.language as tl


def gpu_tiles(operand, major: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) on a GPU of compute capability ``major``.x for operands
    of type ``operand``: FMA for float32, tensor cores for 16-bit types. Chosen so that ptxas spills
    no register under Triton 3.6-3.8 (scripts/check_triton_kernels.py compiles them for sm_80 and
    sm_90): before sm_90, a 128 x 128 tile of 16-bit operands and, under Triton 3.8, a 64 x 128 x 32
    float32 tile need more than 255 registers per thread."""
    if operand == tl.float32:
        return (64, 128, 32, 8) if major >= 9 else (64, 128, 16, 8)
    return (128, 128, 32, 8) if major >= 9 else (128, 64, 32, 8)


@triton.jit
def shift_patch_embed_kernel(
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
