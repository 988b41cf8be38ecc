"""``warp_aggregate_chunked``: warp_aggregate in torch on any device, one chunk of channels (and
rows) at a time, so that its memory does not grow with the number of views."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastsrt.ops.warp_aggregate.reference import checks_arguments, empty_output, frame_inside, frame_mask, output_shape

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


@checks_arguments
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
    result = empty_output(output_shape(tokens, p, output), tokens)
    std = empty_output(result.shape, tokens) if return_std else None

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
                pooled = F.avg_pool2d(piece, p) if scale > 1 else piece
                out[start : start + plane_step, top // scale : bottom // scale] = pooled
    return result, std


def _grouped_mean(chunk: torch.Tensor, shifts: list[tuple[int, int]], p: int, mode: str,
                  ignore_padding: bool) -> torch.Tensor:
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
            inside = torch.stack([frame_mask(h, w, oy, ox, chunk.device)
                                  for oy, ox in zip(row_offsets, col_offsets)])[:, None]  # (K, 1, h, w)
            for piece, reduced in zip(pieces, _reduce(values, inside, reduce, ignore_padding, return_std)):
                # the pixels (i*p + a, j*p + b), a in rows, b in cols, of every token (i, j)
                by_token = piece.view(planes, h, p, w, p).permute(0, 1, 3, 2, 4)
                by_token[..., rows[:, None], cols[None, :]] = reduced[..., None, None]
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
    inside = torch.stack([frame_mask(p * h, p * w, dy, dx, chunk.device)[top:bottom]
                          for dy, dx in shifts])[:, None]  # (K, 1, rows, W)
    return _reduce(values, inside, reduce, ignore_padding, return_std)


def _reduce(values: torch.Tensor, inside: torch.Tensor, reduce: str, ignore_padding: bool,
            return_std: bool) -> list[torch.Tensor]:
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
