"""Inverse-warp upsample + aggregation over views: the second half of SRT.

For view k with shift (dy, dx) and token grid T_k (C, h, w) of a (p*h) x (p*w) image:
    U_k = upsample(T_k, p)                                  nearest, or bilinear as
                                                            F.interpolate(align_corners=False)
    W_k(y, x) = U_k(y + dy, x + dx)   where inside the frame, else empty (the inverse shift)
    out(y, x) = reduce over k of W_k(y, x)
``ignore_padding=False`` (the SRT paper) counts empty pixels as 0 and reduces over all K views;
``ignore_padding=True`` reduces over the views in which the pixel is inside the frame only
(a pixel inside none is 0). ``reduce`` is "mean" or "median" (the lower middle value for an even
count, like torch.median). The optional standard deviation is the population one (divide by the
count) around the mean, over the same values. ``output="token"`` average-pools the result with
kernel = stride = p, as the authors do.

Three implementations with the same signature, and a dispatcher:
- ``warp_aggregate_reference``: plain torch, materialises every warped view (K x B x C x H x W);
  it defines the semantics that the two fast paths are tested against.
- ``warp_aggregate_chunked``: torch, any device, never holds all views: the mean is separable
  (each view upsampled and shifted along x at token-row resolution, summed over the views sharing
  a dy, then upsampled and shifted along y once per distinct dy); median and std gather the K
  values of one chunk of channels and rows at a time.
- ``warp_aggregate_fused``: Triton kernels that read the token grids and write only the output
  (the same grouped mean; median/std on a register tile of the K values per pixel).
``warp_aggregate(..., impl="auto")`` picks the fused kernels for CUDA tensors and the chunked path
otherwise, and returns which one ran.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache, wraps
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastsrt.checks import check_choice
from fastsrt.ops import _triton

UPSAMPLES = ("nearest", "bilinear")
REDUCES = ("mean", "median")
OUTPUTS = ("pixel", "token")
IMPLS = ("auto", "reference", "fused", "chunked")


def check_warp_aggregate_args(tokens, shifts, patch_size, upsample, reduce, output) -> None:
    check_choice("upsample", upsample, UPSAMPLES)
    check_choice("reduce", reduce, REDUCES)
    check_choice("output", output, OUTPUTS)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 5:
        raise ValueError(f"tokens must be a tensor of shape (K, B, C, h, w), got {getattr(tokens, 'shape', type(tokens))}")
    if not tokens.is_floating_point():
        raise TypeError(f"tokens must be a floating-point tensor, got dtype {tokens.dtype}")
    if len(shifts) != tokens.shape[0]:
        raise ValueError(f"{len(shifts)} shifts for {tokens.shape[0]} views")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")


def _checks_arguments(implementation):
    """The public form of an implementation: checks the arguments, then runs it. The dispatcher,
    which checks them once itself, runs ``implementation`` (the wrapper's ``__wrapped__``)."""

    @wraps(implementation)
    def checked(tokens, shifts, patch_size, upsample="nearest", reduce="mean", ignore_padding=False, output="pixel", return_std=False):
        check_warp_aggregate_args(tokens, shifts, patch_size, upsample, reduce, output)
        return implementation(tokens, shifts, patch_size, upsample, reduce, ignore_padding, output, return_std)

    return checked


def upsample_tokens(tokens: torch.Tensor, patch_size: int, mode: str) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, p*h, p*w)."""
    if mode == "nearest":
        return tokens.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)
    return F.interpolate(tokens, scale_factor=patch_size, mode="bilinear", align_corners=False)


def frame_inside(size: int, shift: int, device) -> torch.Tensor:
    """Positions i in [0, size) whose source i + shift lies in the frame [0, size)."""
    source = torch.arange(size, device=device) + shift
    return (source >= 0) & (source < size)


def frame_mask(height: int, width: int, dy: int, dx: int, device) -> torch.Tensor:
    """(height, width): the pixels whose source (y + dy, x + dx) lies in the frame."""
    return frame_inside(height, dy, device)[:, None] & frame_inside(width, dx, device)[None, :]


def inverse_shift(pixels: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W(y, x) = pixels(y + dy, x + dx): returns W (0 where empty) and the (H, W) inside mask."""
    height, width = pixels.shape[-2:]
    inside = frame_mask(height, width, dy, dx, pixels.device)
    rows = (torch.arange(height, device=pixels.device) + dy).clamp(0, height - 1)
    cols = (torch.arange(width, device=pixels.device) + dx).clamp(0, width - 1)
    warped = pixels[..., rows[:, None], cols[None, :]]
    return torch.where(inside, warped, torch.zeros((), dtype=pixels.dtype, device=pixels.device)), inside


@_checks_arguments
def warp_aggregate_reference(
    tokens: torch.Tensor,
    shifts: Sequence[tuple[int, int]],
    patch_size: int,
    upsample: str = "nearest",
    reduce: str = "mean",
    ignore_padding: bool = False,
    output: str = "pixel",
    return_std: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """tokens (K, B, C, h, w) of K views -> (aggregate, std or None), each (B, C, H, W) for
    output="pixel" or (B, C, h, w) for output="token". Computes in float32 at least (float64 stays
    float64) and returns the tokens' dtype."""
    views, batch, channels, h, w = tokens.shape
    compute = tokens.to(torch.promote_types(tokens.dtype, torch.float32))
    pixels = upsample_tokens(compute.flatten(0, 1), patch_size, upsample).unflatten(0, (views, batch))

    warped, inside = zip(*(inverse_shift(pixels[k], dy, dx) for k, (dy, dx) in enumerate(shifts)))
    warped = torch.stack(warped)  # (K, B, C, H, W)
    inside = torch.stack(inside)[:, None, None]  # (K, 1, 1, H, W)
    if not ignore_padding:
        inside = torch.ones_like(inside)  # empty pixels count as zeros
    count = inside.sum(0)  # (1, 1, H, W)
    covered = count > 0

    mean = warped.sum(0) / count.clamp(min=1)
    if reduce == "mean":
        result = mean
    else:
        # lower middle of the values inside: sort with the empty ones last
        ordered = torch.where(inside, warped, torch.tensor(float("inf"), dtype=warped.dtype)).sort(dim=0).values
        middle = ((count - 1) // 2).clamp(min=0).expand(batch, channels, -1, -1)
        result = torch.where(covered, ordered.gather(0, middle[None]).squeeze(0), 0.0)
    std = None
    if return_std:
        deviation = torch.where(inside, warped - mean, 0.0)
        std = ((deviation**2).sum(0) / count.clamp(min=1)).sqrt()

    if output == "token":
        result = F.avg_pool2d(result, patch_size)
        std = F.avg_pool2d(std, patch_size) if std is not None else None
    return result.to(tokens.dtype), (std.to(tokens.dtype) if std is not None else None)


def _empty_output(shape: tuple[int, ...], tokens: torch.Tensor) -> torch.Tensor:
    """An uninitialised output buffer (the fast paths write every element; tests poison it)."""
    return torch.empty(shape, dtype=tokens.dtype, device=tokens.device)


def _output_shape(tokens: torch.Tensor, patch_size: int, output: str) -> tuple[int, int, int, int]:
    _, batch, channels, h, w = tokens.shape
    scale = 1 if output == "token" else patch_size
    return batch, channels, h * scale, w * scale


# ---------------------------------------------------------------------------------------------
# Chunked torch path: any device, memory independent of the number of views.

# elements of the largest tensor a chunk works on (64 MiB in float32); its temporaries are a small
# multiple of it
CHUNK_ELEMENTS = 1 << 24


def upsample_axis(values: torch.Tensor, patch_size: int, mode: str, dim: int) -> torch.Tensor:
    """(n, rows, cols) upsampled by p along dim -2 or -1 only: the reference's upsampling is
    separable (nearest: repeat; bilinear: F.interpolate with scale 1 on the other axis is the
    identity, align_corners=False)."""
    if mode == "nearest":
        return values.repeat_interleave(patch_size, dim=dim)
    scale = (patch_size, 1) if dim == -2 else (1, patch_size)
    return F.interpolate(values[None], scale_factor=scale, mode="bilinear", align_corners=False)[0]


def shift_columns(values: torch.Tensor, dx: int) -> torch.Tensor:
    """W(x) = values(x + dx) along the last axis, zero fill."""
    if abs(dx) >= values.shape[-1]:
        return torch.zeros_like(values)
    return F.pad(values, (-dx, dx))  # a negative pad crops


@_checks_arguments
def warp_aggregate_chunked(
    tokens: torch.Tensor,
    shifts: Sequence[tuple[int, int]],
    patch_size: int,
    upsample: str = "nearest",
    reduce: str = "mean",
    ignore_padding: bool = False,
    output: str = "pixel",
    return_std: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as ``warp_aggregate_reference``, one chunk of channels (and rows) at a time;
    never more than one view at pixel resolution, except the K values of one chunk for median/std.

    - mean (no std): upsampling and the shift are separable and the mean is linear: the views
      sharing a dy are upsampled and shifted along x at token-row resolution, summed, then
      upsampled and shifted along y once per distinct dy (per output element about
      K/p + (distinct dy) operations instead of K).
    - median/std, nearest: since H = p*h, pixel (i*p + a, j*p + b) of view k reads token
      (i + (a + dy_k) // p, j + (b + dx_k) // p), out of frame exactly when that token is off the
      grid. The positions a (and b) inside a token that share those offsets for every view form a
      class (7 per axis for the paper's d = 3 at p = 14); each pair of classes is reduced once at
      token resolution and copied to its pixels: p^2 / (classes^2) times fewer reductions.
    - median/std, bilinear: the K warped values of a chunk of rows, reduced per pixel.
    Reductions: torch.median / nanmedian, the lower middle."""
    views, batch, channels, h, w = tokens.shape
    height, width, p = patch_size * h, patch_size * w, patch_size
    shifts = [(int(dy), int(dx)) for dy, dx in shifts]
    compute = torch.promote_types(tokens.dtype, torch.float32)
    result = _empty_output(_output_shape(tokens, p, output), tokens)
    std = _empty_output(result.shape, tokens) if return_std else None

    planes = tokens.flatten(1, 2)  # (K, B*C, h, w)
    scale = p if output == "token" else 1
    outputs = [result.flatten(0, 1)] + ([std.flatten(0, 1)] if return_std else [])
    per_pixel = upsample == "bilinear" and (reduce == "median" or return_std)
    # rows per chunk: whole token rows (pooling stays in a chunk); all of them but per pixel
    row_step = max(p, CHUNK_ELEMENTS // (views * width) // p * p) if per_pixel else height
    per_plane = max(width * min(row_step, height), views * h * w) * (views if per_pixel else 1)
    plane_step = max(1, CHUNK_ELEMENTS // per_plane)
    for start in range(0, batch * channels, plane_step):
        chunk = planes[:, start : start + plane_step].to(compute)
        for top in range(0, height, row_step):
            bottom = min(top + row_step, height)
            if reduce == "mean" and not return_std:
                pieces = [_grouped_mean(chunk, shifts, p, upsample, ignore_padding)]
            elif upsample == "nearest":
                pieces = _nearest_by_class(chunk, shifts, p, reduce, ignore_padding, return_std)
            else:
                pieces = _bilinear_rows(chunk, shifts, p, top, bottom, reduce, ignore_padding, return_std)
            for out, piece in zip(outputs, pieces):
                out[start : start + plane_step, top // scale : bottom // scale] = F.avg_pool2d(piece, p) if scale > 1 else piece
    return result, std


def _grouped_mean(chunk: torch.Tensor, shifts: list[tuple[int, int]], p: int, mode: str, ignore_padding: bool) -> torch.Tensor:
    """The mean over views of a chunk of token grids (K, n, h, w) -> (n, H, W)."""
    views, planes, h, w = chunk.shape
    height = p * h
    by_dy: dict[int, list[int]] = {}
    for k, (dy, _) in enumerate(shifts):
        by_dy.setdefault(dy, []).append(k)
    total = chunk.new_zeros((planes, height, p * w))
    for dy, members in by_dy.items():
        top, bottom = max(0, -dy), min(height, height - dy)  # output rows whose source row is in the frame
        if top >= bottom:
            continue
        columns = shift_columns(upsample_axis(chunk[members[0]], p, mode, -1), shifts[members[0]][1])
        for k in members[1:]:
            columns += shift_columns(upsample_axis(chunk[k], p, mode, -1), shifts[k][1])
        total[:, top:bottom] += upsample_axis(columns, p, mode, -2)[:, top + dy : bottom + dy]
    if not ignore_padding:
        return total.div_(views)
    return total.div_(_coverage(shifts, height, p * w, chunk.device).clamp_(min=1))


def _coverage(shifts, height: int, width: int, device) -> torch.Tensor:
    """(H, W): the number of views whose frame covers each output pixel."""
    rows = torch.stack([frame_inside(height, dy, device) for dy, _ in shifts]).float()
    cols = torch.stack([frame_inside(width, dx, device) for _, dx in shifts]).float()
    return rows.T @ cols  # exact: small integers in float32


def _offset_classes(shifts_along: list[int], p: int) -> list[tuple[torch.Tensor, list[int]]]:
    """Positions a in [0, p) inside a token grouped by the token offsets (a + d) // p they read
    in every view (d: each view's shift along this axis): [(positions, offsets per view)]."""
    classes: dict[tuple[int, ...], list[int]] = {}
    for a in range(p):
        classes.setdefault(tuple((a + d) // p for d in shifts_along), []).append(a)
    return [(torch.tensor(positions), list(offsets)) for offsets, positions in classes.items()]


def _nearest_by_class(chunk: torch.Tensor, shifts: list[tuple[int, int]], p: int,
                      reduce: str, ignore_padding: bool, return_std: bool) -> list[torch.Tensor]:
    """Nearest median/std of a chunk of token grids (K, n, h, w) -> [aggregate(, std)], each
    (n, H, W), reduced once per pair of offset classes at token resolution."""
    views, planes, h, w = chunk.shape
    margin = max(max(abs(dy), abs(dx)) for dy, dx in shifts) // p + 1
    padded = F.pad(chunk, (margin, margin, margin, margin))  # off-grid tokens are 0
    pieces = [chunk.new_empty((planes, p * h, p * w)) for _ in range(1 + return_std)]
    for rows, row_offsets in _offset_classes([dy for dy, _ in shifts], p):
        for cols, col_offsets in _offset_classes([dx for _, dx in shifts], p):
            values = torch.stack([padded[k, :, margin + oy : margin + oy + h, margin + ox : margin + ox + w]
                                  for k, (oy, ox) in enumerate(zip(row_offsets, col_offsets))])
            # a token (i, j) reads token (i + oy, j + ox), out of frame exactly when that is off the grid
            inside = torch.stack([frame_mask(h, w, oy, ox, chunk.device) for oy, ox in zip(row_offsets, col_offsets)])[:, None]  # (K, 1, h, w)
            for piece, reduced in zip(pieces, _reduce(values, inside, reduce, ignore_padding, return_std)):
                # the pixels (i*p + a, j*p + b), a in rows, b in cols, of every token (i, j)
                piece.view(planes, h, p, w, p).permute(0, 1, 3, 2, 4)[..., rows[:, None], cols[None, :]] = reduced[..., None, None]
    return pieces


def _write_view_rows(rows: torch.Tensor, tokens: torch.Tensor, dy: int, dx: int, p: int, top: int) -> None:
    """Writes rows [top, top + len) of one bilinear warped view W(y, x) = upsample(tokens)(y + dy,
    x + dx) into ``rows`` (n, len, W), which holds zeros: only the in-frame rectangle is written.
    Upsamples only the token rows it reads, plus one of margin so that the border clamp stays
    the full grid's."""
    h, w = tokens.shape[-2:]
    bottom = top + rows.shape[1]
    source_top, source_bottom = max(0, top + dy), min(p * h, bottom + dy)
    left, right = max(0, -dx), min(p * w, p * w - dx)  # output columns whose source is in the frame
    if source_top >= source_bottom or left >= right:
        return
    first, last = max(0, source_top // p - 1), min(h, (source_bottom - 1) // p + 2)
    pixels = upsample_axis(upsample_axis(tokens[:, first:last], p, "bilinear", -1), p, "bilinear", -2)
    rows[:, source_top - dy - top : source_bottom - dy - top, left:right] = \
        pixels[:, source_top - first * p : source_bottom - first * p, left + dx : right + dx]


def _bilinear_rows(chunk: torch.Tensor, shifts: list[tuple[int, int]], p: int, top: int, bottom: int,
                   reduce: str, ignore_padding: bool, return_std: bool) -> list[torch.Tensor]:
    """Output rows [top, bottom) of a chunk (K, n, h, w), bilinear: [aggregate(, std)], each
    (n, bottom - top, W), from the K warped values of the chunk (K, n, bottom - top, W)."""
    views, _, h, w = chunk.shape
    values = chunk.new_zeros((views, chunk.shape[1], bottom - top, p * w))
    for k, (dy, dx) in enumerate(shifts):
        _write_view_rows(values[k], chunk[k], dy, dx, p, top)
    inside = torch.stack([frame_mask(p * h, p * w, dy, dx, chunk.device)[top:bottom] for dy, dx in shifts])[:, None]  # (K, 1, rows, W)
    return _reduce(values, inside, reduce, ignore_padding, return_std)


def _reduce(values: torch.Tensor, inside: torch.Tensor, reduce: str, ignore_padding: bool, return_std: bool) -> list[torch.Tensor]:
    """Warped values (K, n, rows, cols), 0 out of frame, and the in-frame mask (K, 1, rows, cols)
    -> [aggregate(, std)] over the views (all of them, or those inside with ignore_padding).
    Overwrites ``values``."""
    count = inside.sum(0) if ignore_padding else torch.tensor(values.shape[0], device=values.device)
    mean = values.sum(0).div_(count.clamp(min=1))
    pieces = [mean]
    if return_std:
        deviation = values - mean
        if ignore_padding:
            deviation.masked_fill_(~inside, 0)
        pieces.append(deviation.square_().sum(0).div_(count.clamp(min=1)).sqrt_())
    if reduce == "median":
        if ignore_padding:  # nanmedian: the lower middle of the values inside; NaN where none is
            median = values.masked_fill_(~inside, float("nan")).nanmedian(0).values
            pieces[0] = median.masked_fill_(count == 0, 0)
        else:
            pieces[0] = values.median(0).values
    return pieces


# ---------------------------------------------------------------------------------------------
# Fused Triton path. The kernels below are plain functions until ``_triton.jit_kernels`` wraps
# them on first use (binding tl): importing fastsrt never needs Triton, and TRITON_INTERPRET=1
# (CPU tensors) is honoured whenever it is set before a fused call.

tl = None  # triton.language, bound by _triton.jit_kernels
_TRITON_FUNCTIONS = ("_axis_taps", "_sample_token_row", "_lower_middle", "_grouped_mean_kernel", "_per_pixel_kernel")
_SELECT_MAX_VIEWS = 16  # up to this many (padded) views the median is a rank selection, above it a sort


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


def _sample_token_row(view_ptr, row, h, w, first, second, w_first, w_second, mask, BILINEAR: tl.constexpr, ACC: tl.constexpr):
    """Horizontal sampling of token row ``row`` of one view: [N] values (0 where row >= h)."""
    ok = mask & (row < h)
    row_ptr = view_ptr + row * w
    value = w_first * tl.load(row_ptr + first, mask=ok, other=0.0).to(ACC)
    if BILINEAR:
        value += w_second * tl.load(row_ptr + second, mask=ok, other=0.0).to(ACC)
    return value


def _grouped_mean_kernel(
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
            c_first, c_second, wc_first, wc_second, c_inside = _axis_taps(x, tl.load(dx_ptr + i), patch, w, BILINEAR, ACC)
            row0 += _sample_token_row(view_ptr, base, h, w, c_first, c_second, wc_first, wc_second, col_ok, BILINEAR, ACC)
            row1 += _sample_token_row(view_ptr, base + 1, h, w, c_first, c_second, wc_first, wc_second, col_ok, BILINEAR, ACC)
            if BILINEAR:
                row2 += _sample_token_row(view_ptr, base + 2, h, w, c_first, c_second, wc_first, wc_second, col_ok, BILINEAR, ACC)
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
        offsets = plane[:, :, None].to(tl.int64) * h * w * patch * patch + y[None, :, None] * (w * patch) + x[:, None, :]
        tl.store(out_ptr + offsets, mean.to(out_ptr.dtype.element_ty), mask=keep)


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


def _per_pixel_kernel(
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
            value += wr_second * wc_second * tl.load(view_ptr + r_second * w + c_second, mask=load_ok, other=0.0).to(ACC)
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


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@_checks_arguments
def warp_aggregate_fused(
    tokens: torch.Tensor,
    shifts: Sequence[tuple[int, int]],
    patch_size: int,
    upsample: str = "nearest",
    reduce: str = "mean",
    ignore_padding: bool = False,
    output: str = "pixel",
    return_std: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as ``warp_aggregate_reference``, in one Triton kernel launch that reads the
    token grids and writes only the outputs: the grouped mean, or (median, std) the per-pixel
    register tile. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; a RuntimeError elsewhere
    (``warp_aggregate`` falls back to the chunked path instead)."""
    triton = _triton.require(tokens, "warp_aggregate's fused Triton kernels")
    _triton.jit_kernels(globals(), _TRITON_FUNCTIONS)
    views, batch, channels, h, w = tokens.shape
    tokens = tokens.contiguous()
    shifts = tuple((int(dy), int(dx)) for dy, dx in shifts)
    result = _empty_output(_output_shape(tokens, patch_size, output), tokens)
    std = _empty_output(result.shape, tokens) if return_std else None
    if result.numel() == 0:
        return result, std
    planes = batch * channels
    # elements per program's tile: the interpreter pays per program and per op, a GPU per register
    # (the per-pixel tile holds K values per output and spills above 2048 on sm_90)
    interpreted = _triton.interpreting()
    flags = dict(IGNORE_PADDING=ignore_padding, BILINEAR=upsample == "bilinear", TOKEN_OUTPUT=output == "token",
                 ACC=tl.float64 if tokens.dtype == torch.float64 else tl.float32)
    with _triton.on_device(tokens):
        if reduce == "mean" and not return_std:
            order, dx, group_dy, group_start = _grouped_shift_tables(shifts, tokens.device)
            tile = 1 << 15 if interpreted else 4096
            p_pad = _next_power_of_2(patch_size)
            tokens_w = max(1, min(tile // (p_pad * p_pad), _next_power_of_2(w), 8))
            block_c = max(1, min(tile // (p_pad * p_pad * tokens_w), _next_power_of_2(planes)))
            # planes on axis 0 (up to 2^31 - 1 programs); token rows and columns stay far below 65535
            _grouped_mean_kernel[(triton.cdiv(planes, block_c), h, triton.cdiv(w, tokens_w))](
                tokens, result, order, dx, group_dy, group_start,
                group_dy.numel(), views, planes, h, w, patch_size, planes * h * w,
                BLOCK_C=block_c, P_PAD=p_pad, TOKENS_W=tokens_w, **flags,
            )
        else:
            dy, dx = _shift_tables(shifts, tokens.device)
            tile = 1 << 15 if interpreted else 2048
            k_pad = _next_power_of_2(views)
            positions = result[0, 0].numel()
            block_c = min(_next_power_of_2(planes), 4)
            block_p = max(1, min(tile // (block_c * k_pad), _next_power_of_2(positions)))
            position_blocks = triton.cdiv(positions, block_p)
            _per_pixel_kernel[(triton.cdiv(planes, block_c) * position_blocks,)](
                tokens, result, result if std is None else std, dy, dx,
                views, planes, h, w, patch_size, planes * h * w, position_blocks,
                MEDIAN=reduce == "median", RETURN_STD=return_std,
                BLOCK_C=block_c, BLOCK_P=block_p, K_PAD=k_pad, SELECT_MAX=_SELECT_MAX_VIEWS, **flags,
            )
    return result, std


@lru_cache(maxsize=64)
def _shift_tables(shifts: tuple[tuple[int, int], ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy, dx) int32 on ``device``, made once per shifts and device (no host copy per call).
    The kernels only read them."""
    return (torch.tensor([dy for dy, _ in shifts], dtype=torch.int32, device=device),
            torch.tensor([dx for _, dx in shifts], dtype=torch.int32, device=device))


@lru_cache(maxsize=64)
def _grouped_shift_tables(shifts: tuple[tuple[int, int], ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The grouped mean's int32 tables on ``device``, made once per shifts and device: the views
    sorted by dy (order), their dx in that order, each group's dy and its first index in order
    (with the view count appended)."""
    order = sorted(range(len(shifts)), key=lambda k: shifts[k][0])
    group_dy, group_start = [], []
    for i, k in enumerate(order):
        if not group_dy or shifts[k][0] != group_dy[-1]:
            group_dy.append(shifts[k][0])
            group_start.append(i)
    tables = (order, [shifts[k][1] for k in order], group_dy, group_start + [len(shifts)])
    return tuple(torch.tensor(values, dtype=torch.int32, device=device) for values in tables)


# ---------------------------------------------------------------------------------------------
# Dispatch


class WarpAggregateOutput(NamedTuple):
    result: torch.Tensor
    std: torch.Tensor | None
    impl: str  # the implementation that ran: "reference", "fused" or "chunked"


# the unchecked implementations: warp_aggregate checks the arguments once itself
_IMPLEMENTATIONS = {name: function.__wrapped__ for name, function in
                    [("reference", warp_aggregate_reference), ("fused", warp_aggregate_fused), ("chunked", warp_aggregate_chunked)]}


def warp_aggregate(
    tokens: torch.Tensor,
    shifts: Sequence[tuple[int, int]],
    patch_size: int,
    upsample: str = "nearest",
    reduce: str = "mean",
    ignore_padding: bool = False,
    output: str = "pixel",
    return_std: bool = False,
    impl: str = "auto",
) -> WarpAggregateOutput:
    """``warp_aggregate_reference``'s contract through the implementation ``impl`` picks:
    "auto" (fused Triton on CUDA tensors, chunked torch otherwise), "reference", "fused" (CUDA, or
    CPU under TRITON_INTERPRET=1) or "chunked". Where the fused kernels cannot run (no Triton, no
    GPU) it falls back to "chunked" with one warning. Returns (result, std, impl that ran)."""
    check_choice("impl", impl, IMPLS)
    check_warp_aggregate_args(tokens, shifts, patch_size, upsample, reduce, output)
    chosen = choose_impl(impl, tokens.device)
    result, std = _IMPLEMENTATIONS[chosen](tokens, shifts, patch_size, upsample, reduce, ignore_padding, output, return_std)
    return WarpAggregateOutput(result, std, chosen)


def choose_impl(impl: str, device: torch.device) -> str:
    """The implementation ``warp_aggregate`` runs for ``impl`` on tensors of ``device``."""
    if impl in ("reference", "chunked"):
        return impl
    if impl == "auto" and device.type != "cuda":
        return "chunked"
    reason = _triton.unavailable(device)
    if reason is None:
        return "fused"
    _triton.warn_once(f"{reason}: warp_aggregate falls back to the chunked torch path", stacklevel=4)
    return "chunked"
