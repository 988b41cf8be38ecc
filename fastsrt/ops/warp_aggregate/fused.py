"""``warp_aggregate_fused``: the launcher of warp_aggregate's Triton kernels (``kernels.py``): the
views' shift tables on the device, the tile sizes and the launch grid. The kernel module is
imported on the first fused call, never by importing fastsrt."""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from fastsrt.errors import Unavailable
from fastsrt.ops import _triton
from fastsrt.ops.warp_aggregate.reference import checks_arguments, empty_output, output_shape

SELECT_MAX_VIEWS = 16  # up to this many (padded) views the median is a rank selection, above it a sort


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(n: int, d: int) -> int:
    return -(-n // d)


@checks_arguments
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
    register tile. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; ``Unavailable`` elsewhere
    (``warp_aggregate`` falls back to the chunked path instead)."""
    reasons = _triton.not_supported_reasons(tokens.device)
    if reasons:
        raise Unavailable(f"warp_aggregate's fused Triton kernels cannot run on this {tokens.device.type} tensor: "
                          f"{'; '.join(reasons)}")
    kernels = _triton.kernels("fastsrt.ops.warp_aggregate.kernels")
    views, batch, channels, h, w = tokens.shape
    tokens = tokens.contiguous()
    shifts = tuple((int(dy), int(dx)) for dy, dx in shifts)
    result = empty_output(output_shape(tokens, patch_size, output), tokens)
    std = empty_output(result.shape, tokens) if return_std else None
    if result.numel() == 0:
        return result, std
    planes = batch * channels
    # elements per program's tile: the interpreter pays per program and per op, a GPU per register
    # (kernels.grouped_mean_tile, kernels.per_pixel_tile: the per-pixel tile holds K values per output)
    interpreted = _triton.interpreting()
    major = torch.cuda.get_device_capability(tokens.device)[0] if tokens.is_cuda else 0
    flags = dict(IGNORE_PADDING=ignore_padding, BILINEAR=upsample == "bilinear", TOKEN_OUTPUT=output == "token",
                 ACC=kernels.tl.float64 if tokens.dtype == torch.float64 else kernels.tl.float32)
    with _triton.on_device(tokens):
        if reduce == "mean" and not return_std:
            order, dx, group_dy, group_start = _grouped_shift_tables(shifts, tokens.device)
            tile = 1 << 15 if interpreted else kernels.grouped_mean_tile(tokens.dtype == torch.float64)
            p_pad = _next_power_of_2(patch_size)
            tokens_w = max(1, min(tile // (p_pad * p_pad), _next_power_of_2(w), 8))
            block_c = max(1, min(tile // (p_pad * p_pad * tokens_w), _next_power_of_2(planes)))
            # planes on axis 0 (up to 2^31 - 1 programs); token rows and columns stay far below 65535
            kernels.grouped_mean_kernel[(_cdiv(planes, block_c), h, _cdiv(w, tokens_w))](
                tokens, result, order, dx, group_dy, group_start,
                group_dy.numel(), views, planes, h, w, patch_size, planes * h * w,
                BLOCK_C=block_c, P_PAD=p_pad, TOKENS_W=tokens_w, **flags,
            )
        else:
            dy, dx = _shift_tables(shifts, tokens.device)
            k_pad = _next_power_of_2(views)
            tile = 1 << 15 if interpreted else kernels.per_pixel_tile(major, tokens.dtype == torch.float64, k_pad)
            positions = result[0, 0].numel()
            block_c = max(1, min(_next_power_of_2(planes), 4, tile // k_pad))
            block_p = max(1, min(tile // (block_c * k_pad), _next_power_of_2(positions)))
            position_blocks = _cdiv(positions, block_p)
            kernels.per_pixel_kernel[(_cdiv(planes, block_c) * position_blocks,)](
                tokens, result, result if std is None else std, dy, dx,
                views, planes, h, w, patch_size, planes * h * w, position_blocks,
                MEDIAN=reduce == "median", RETURN_STD=return_std,
                BLOCK_C=block_c, BLOCK_P=block_p, K_PAD=k_pad, SELECT_MAX=SELECT_MAX_VIEWS, **flags,
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
