"""``warp_aggregate``: the three implementations as ``fastsrt.dispatch`` implementations, and the
function that checks the arguments once, picks one and returns what ran."""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from fastsrt.dispatch import Implementation, choose
from fastsrt.ops import _triton
from fastsrt.ops.warp_aggregate.chunked import warp_aggregate_chunked
from fastsrt.ops.warp_aggregate.fused import warp_aggregate_fused
from fastsrt.ops.warp_aggregate.reference import check_warp_aggregate_args, warp_aggregate_reference


class WarpAggregateOutput(NamedTuple):
    result: torch.Tensor
    std: torch.Tensor | None
    impl: str  # the implementation that ran: "reference", "fused" or "chunked"


# Each runs its function unchecked (``__wrapped__``): warp_aggregate checks the arguments once itself.
class Reference(Implementation):
    name = "reference"
    auto_devices = frozenset()  # materialises every view: only when asked for

    def __call__(self, *args):
        return warp_aggregate_reference.__wrapped__(*args)


class Fused(Implementation):
    name = "fused"
    auto_devices = frozenset({"cuda"})  # on CPU tensors the interpreter is far slower than chunked
    fallback = "chunked"

    def not_supported_reasons(self, tokens, *args) -> list[str]:
        return _triton.not_supported_reasons(tokens.device)

    def __call__(self, *args):
        return warp_aggregate_fused.__wrapped__(*args)


class Chunked(Implementation):
    name = "chunked"

    def __call__(self, *args):
        return warp_aggregate_chunked.__wrapped__(*args)


IMPLEMENTATIONS = (Reference(), Fused(), Chunked())  # auto's order of preference


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
    check_warp_aggregate_args(tokens, shifts, patch_size, upsample, reduce, output)
    args = (tokens, shifts, patch_size, upsample, reduce, ignore_padding, output, return_std)
    chosen = choose("warp_aggregate", IMPLEMENTATIONS, impl, tokens.device.type, *args)
    result, std = chosen(*args)
    return WarpAggregateOutput(result, std, chosen.name)
