"""warp_aggregate's Triton kernels: they read the K token grids and write only the output.
``grouped_mean_kernel`` computes the mean in the separable form of the chunked path;
``per_pixel_kernel`` the median and/or std on a register tile of the K values per output pixel.

Imported only when a fused path runs, through ``fastsrt.ops._triton.kernels`` (which re-imports
this module when TRITON_INTERPRET changes, so that the kernels run in the mode it names).
"""
import triton
import triton.language as tl

# The register tiles on a GPU: the largest that ptxas compiles without spilling under Triton 3.6-3.8
# (scripts/check_triton_kernels.py checks sm_80 and sm_90); a float64 tile holds a quarter of the
# elements of a float32 one.


def grouped_mean_tile(double: bool) -> int:
    """Elements (planes x token columns x P_PAD^2 pixels) of a grouped-mean program's tile, for
    float32 (or float64, ``double``) accumulation."""
    return 4096 // (4 if double else 1)


def per_pixel_tile(major: int, double: bool, k_pad: int) -> int:
    """Elements (planes x outputs x padded views) of a per-pixel program's tile on a GPU of compute
    capability ``major``.x: sm_90 fits twice the tile of sm_80; sorting more than 128 views, half."""
    return (2048 if major >= 9 else 1024) // (2 if k_pad > 128 else 1) // (4 if double else 1)


@triton.jit
def _axis_taps(pos, shift, patch, n_tokens, BILINEAR: tl.constexpr, ACC: tl.constexpr):
    """One axis of W(y, x) = upsample(tokens)(y + dy, x + dx) at output positions ``pos``: the two
    token indices and weights (0 out of frame; nearest: one tap, weight 1) and the inside mask.
    Bilinear follows F.interpolate(align_corners=False, scale_factor=p): source coordinate
    (i + 0.5) * fl(1/p) - 0.5 clamped at 0, the upper neighbour clamped at n - 1. Indices are
    clamped into [0, n_tokens), so every load is in bounds."""
    source = pos + shift
    inside = (source >= 0) & (source < patch * n_tokens)
    if BILINEAR:
        real = (source.to(ACC) + 0.5) * (tl.full((), 1.0, ACC) / patch) - 0.5
        real = tl.maximum(real, 0.0)
        first = tl.minimum(real.to(tl.int32), n_tokens - 1)  # truncation = floor for real >= 0
        lam = real - first.to(ACC)
        second = tl.minimum(first + 1, n_tokens - 1)
        w_first = tl.where(inside, 1.0 - lam, 0.0)
        w_second = tl.where(inside, lam, 0.0)
    else:
        first = tl.minimum(tl.maximum(source, 0) // patch, n_tokens - 1)
        second = first
        w_first = tl.where(inside, 1.0, 0.0).to(ACC)
        w_second = tl.zeros_like(w_first)
    return first, second, w_first, w_second, inside


@triton.jit
def _sample_token_row(view_ptr, row, h, w, first, second, w_first, w_second, mask,
                      BILINEAR: tl.constexpr, ACC: tl.constexpr):
    """Horizontal sampling of token row ``row`` of one view: [N] values (0 where row >= h)."""
    ok = mask & (row < h)
    row_ptr = view_ptr + row * w
    value = w_first * tl.load(row_ptr + first, mask=ok, other=0.0).to(ACC)
    if BILINEAR:
        value += w_second * tl.load(row_ptr + second, mask=ok, other=0.0).to(ACC)
    return value


@triton.jit
def grouped_mean_kernel(
    tokens_ptr, out_ptr, order_ptr, dx_ptr, group_dy_ptr, group_start_ptr,
    groups, views, planes, h, w, patch, view_stride,
    IGNORE_PADDING: tl.constexpr, BILINEAR: tl.constexpr, TOKEN_OUTPUT: tl.constexpr,
    BLOCK_C: tl.constexpr, P_PAD: tl.constexpr, TOKENS_W: tl.constexpr, ACC: tl.constexpr,
):
    """Mean over views for BLOCK_C (b, c) planes, one token row and TOKENS_W token columns: a tile
    [BLOCK_C, P_PAD rows, TOKENS_W * P_PAD columns] (p padded to a power of two). Views come
    sorted by dy and grouped; for each group, its views' horizontally sampled token rows are
    summed (p consecutive output rows read only token rows base, base+1, base+2), then weighted
    vertically once per group: the separable form of ``warp_aggregate_chunked``."""
    plane = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]  # [BLOCK_C, 1]
    token_row = tl.program_id(1)
    a = tl.arange(0, P_PAD)
    n = tl.arange(0, TOKENS_W * P_PAD)[None, :]
    token_col = tl.program_id(2) * TOKENS_W + n // P_PAD
    row_ok = a < patch
    col_ok = (n % P_PAD < patch) & (token_col < w) & (plane < planes)  # [BLOCK_C, N]
    y = token_row * patch + a
    x = token_col * patch + n % P_PAD
    plane_ptr = tokens_ptr + plane.to(tl.int64) * h * w

    total = tl.zeros([BLOCK_C, P_PAD, TOKENS_W * P_PAD], ACC)
    count = tl.zeros([1, P_PAD, TOKENS_W * P_PAD], ACC)
    for g in range(groups):
        dy = tl.load(group_dy_ptr + g)
        r_first, r_second, wr_first, wr_second, r_inside = _axis_taps(y, dy, patch, h, BILINEAR, ACC)
        base = tl.min(tl.where(row_ok, r_first, h), axis=0)
        row0 = tl.zeros([BLOCK_C, TOKENS_W * P_PAD], ACC)
        row1 = tl.zeros([BLOCK_C, TOKENS_W * P_PAD], ACC)
        row2 = tl.zeros([BLOCK_C, TOKENS_W * P_PAD], ACC)
        covering = tl.zeros([1, TOKENS_W * P_PAD], ACC)
        for i in range(tl.load(group_start_ptr + g), tl.load(group_start_ptr + g + 1)):
            view_ptr = plane_ptr + tl.load(order_ptr + i).to(tl.int64) * view_stride
            dx = tl.load(dx_ptr + i)
            c_first, c_second, wc_first, wc_second, c_inside = _axis_taps(x, dx, patch, w, BILINEAR, ACC)
            row0 += _sample_token_row(view_ptr, base, h, w, c_first, c_second, wc_first, wc_second, col_ok,
                                      BILINEAR, ACC)
            row1 += _sample_token_row(view_ptr, base + 1, h, w, c_first, c_second, wc_first, wc_second, col_ok,
                                      BILINEAR, ACC)
            if BILINEAR:
                row2 += _sample_token_row(view_ptr, base + 2, h, w, c_first, c_second, wc_first, wc_second, col_ok,
                                          BILINEAR, ACC)
            if IGNORE_PADDING:
                covering += c_inside.to(ACC)
        # vertical weights of token rows base + s for each output row (both taps may hit one row)
        wy0 = tl.where(r_first == base, wr_first, 0.0) + tl.where(r_second == base, wr_second, 0.0)
        wy1 = tl.where(r_first == base + 1, wr_first, 0.0) + tl.where(r_second == base + 1, wr_second, 0.0)
        total += wy0[None, :, None] * row0[:, None, :] + wy1[None, :, None] * row1[:, None, :]
        if BILINEAR:
            wy2 = tl.where(r_second == base + 2, wr_second, 0.0)
            total += wy2[None, :, None] * row2[:, None, :]
        if IGNORE_PADDING:
            count += r_inside.to(ACC)[None, :, None] * covering[:, None, :]

    if IGNORE_PADDING:
        mean = total / tl.maximum(count, 1.0)
    else:
        mean = total / views
    keep = row_ok[None, :, None] & col_ok[:, None, :]
    if TOKEN_OUTPUT:  # average pool over each token's p x p pixels
        column_sums = tl.sum(tl.where(keep, mean, 0.0), axis=1)  # [BLOCK_C, N]
        pooled = tl.sum(tl.reshape(column_sums, [BLOCK_C, TOKENS_W, P_PAD]), axis=2) / (patch * patch)
        cols = tl.program_id(2) * TOKENS_W + tl.arange(0, TOKENS_W)[None, :]
        offsets = plane.to(tl.int64) * h * w + token_row * w + cols
        tl.store(out_ptr + offsets, pooled.to(out_ptr.dtype.element_ty), mask=(cols < w) & (plane < planes))
    else:
        plane_start = plane[:, :, None].to(tl.int64) * h * w * patch * patch
        offsets = plane_start + y[None, :, None] * (w * patch) + x[:, None, :]
        tl.store(out_ptr + offsets, mean.to(out_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _lower_middle(keyed, middle, K_PAD: tl.constexpr, SELECT_MAX: tl.constexpr):
    """keyed [C, P, K_PAD] (left-out views are +inf), middle [C, P] -> the middle-th smallest.
    Small K: rank selection in registers (the element whose rank, ties broken by view index, is
    middle). Larger K: a bitonic sort along the views (tl.sort), then pick."""
    k = tl.arange(0, K_PAD)[None, None, :]
    if K_PAD <= SELECT_MAX:
        chosen = tl.zeros(middle.shape, keyed.dtype)
        for j in tl.static_range(K_PAD):
            candidate = tl.sum(tl.where(k == j, keyed, 0.0), axis=2)
            below = (keyed < candidate[:, :, None]) | ((keyed == candidate[:, :, None]) & (k < j))
            rank = tl.sum(below.to(tl.int32), axis=2)
            chosen = tl.where(rank == middle, candidate, chosen)
        return chosen
    ordered = tl.sort(keyed, dim=2)
    return tl.sum(tl.where(k == middle[:, :, None], ordered, 0.0), axis=2)


@triton.jit
def per_pixel_kernel(
    tokens_ptr, out_ptr, std_ptr, dy_ptr, dx_ptr,
    views, planes, h, w, patch, view_stride, position_blocks,
    MEDIAN: tl.constexpr, RETURN_STD: tl.constexpr, IGNORE_PADDING: tl.constexpr,
    BILINEAR: tl.constexpr, TOKEN_OUTPUT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, K_PAD: tl.constexpr, SELECT_MAX: tl.constexpr, ACC: tl.constexpr,
):
    """Median and/or std (and the mean with std): a [BLOCK_C planes, BLOCK_P outputs, K_PAD views]
    register tile of the sampled values per output pixel, reduced over the views. A token output
    loops over its p x p pixels and averages their results (the fused average pool). A 1-D grid
    (axes 1 and 2 stop at 65535 programs): program = plane block * position_blocks + position
    block, so that neighbouring programs read the same planes."""
    if TOKEN_OUTPUT:
        out_w = w
        out_size = h * w
        sub_pixels = patch * patch
    else:
        out_w = w * patch
        out_size = h * w * patch * patch
        sub_pixels = 1
    program = tl.program_id(0)
    out_pos = (program % position_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)[None, :]  # [1, BLOCK_P]
    out_plane = (program // position_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]  # [BLOCK_C, 1]
    out_ok = (out_pos < out_size) & (out_plane < planes)
    pos = out_pos[:, :, None]  # the tile axes: [planes, outputs, views]
    k = tl.arange(0, K_PAD)[None, None, :]
    dy = tl.load(dy_ptr + k, mask=k < views, other=0)
    dx = tl.load(dx_ptr + k, mask=k < views, other=0)
    load_ok = out_ok[:, :, None] & (k < views)
    view_ptr = tokens_ptr + k.to(tl.int64) * view_stride + out_plane[:, :, None].to(tl.int64) * h * w

    result = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    spread = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    for s in range(sub_pixels):
        if TOKEN_OUTPUT:
            y = (pos // out_w) * patch + s // patch
            x = (pos % out_w) * patch + s % patch
        else:
            y = pos // out_w
            x = pos % out_w
        r_first, r_second, wr_first, wr_second, r_inside = _axis_taps(y, dy, patch, h, BILINEAR, ACC)
        c_first, c_second, wc_first, wc_second, c_inside = _axis_taps(x, dx, patch, w, BILINEAR, ACC)
        value = wr_first * wc_first * tl.load(view_ptr + r_first * w + c_first, mask=load_ok, other=0.0).to(ACC)
        if BILINEAR:
            value += wr_first * wc_second * tl.load(view_ptr + r_first * w + c_second, mask=load_ok, other=0.0).to(ACC)
            value += wr_second * wc_first * tl.load(view_ptr + r_second * w + c_first, mask=load_ok, other=0.0).to(ACC)
            corner = tl.load(view_ptr + r_second * w + c_second, mask=load_ok, other=0.0)
            value += wr_second * wc_second * corner.to(ACC)
        if IGNORE_PADDING:
            counted = load_ok & r_inside & c_inside
        else:
            counted = load_ok  # every view; out-of-frame values are 0
        count = tl.sum(counted.to(tl.int32), axis=2)
        mean = tl.sum(tl.where(counted, value, 0.0), axis=2) / tl.maximum(count, 1).to(ACC)
        if MEDIAN:
            median = _lower_middle(tl.where(counted, value, float("inf")), (count - 1) // 2, K_PAD, SELECT_MAX)
            result += tl.where(count > 0, median, 0.0)
        else:
            result += mean
        if RETURN_STD:
            deviation = tl.where(counted, value - mean[:, :, None], 0.0)
            spread += tl.sqrt(tl.sum(deviation * deviation, axis=2) / tl.maximum(count, 1).to(ACC))

    offsets = out_plane.to(tl.int64) * out_size + out_pos
    tl.store(out_ptr + offsets, (result / sub_pixels).to(out_ptr.dtype.element_ty), mask=out_ok)
    if RETURN_STD:
        tl.store(std_ptr + offsets, (spread / sub_pixels).to(std_ptr.dtype.element_ty), mask=out_ok)
