"""Inverse-warp upsample + aggregation over views: the second half of SRT (docs/method.md, "SRT").

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
- ``reference.py``, ``warp_aggregate_reference``: plain torch, materialises every warped view
  (K x B x C x H x W); it defines the semantics that the two fast paths are tested against.
- ``chunked.py``, ``warp_aggregate_chunked``: torch, any device, never holds all views: the mean
  is separable (each view upsampled and shifted along x at token-row resolution, summed over the
  views sharing a dy, then upsampled and shifted along y once per distinct dy); median and std
  gather the K values of one chunk of channels and rows at a time.
- ``fused.py``, ``warp_aggregate_fused``: launches the Triton kernels of ``kernels.py``, which read
  the token grids and write only the output (the same grouped mean; median/std on a register tile
  of the K values per pixel).
``dispatch.py``, ``warp_aggregate(..., impl="auto")``: the fused kernels for CUDA tensors and the
chunked path otherwise; returns which one ran.
"""
from fastsrt.ops.warp_aggregate.chunked import warp_aggregate_chunked
from fastsrt.ops.warp_aggregate.dispatch import WarpAggregateOutput, warp_aggregate
from fastsrt.ops.warp_aggregate.fused import warp_aggregate_fused
from fastsrt.ops.warp_aggregate.reference import check_warp_aggregate_args, upsample_tokens, warp_aggregate_reference
from fastsrt.options import OUTPUTS, REDUCES, UPSAMPLES
from fastsrt.options import SRT_IMPLS as IMPLS

__all__ = [
    "IMPLS",
    "OUTPUTS",
    "REDUCES",
    "UPSAMPLES",
    "WarpAggregateOutput",
    "check_warp_aggregate_args",
    "upsample_tokens",
    "warp_aggregate",
    "warp_aggregate_chunked",
    "warp_aggregate_fused",
    "warp_aggregate_reference",
]
