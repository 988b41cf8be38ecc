"""SRT's K views through a timm ViT without ever making the shifted images.

The fused shift + patchify + patch-embedding kernel (fastsrt.ops.patch_embed) turns the original
images and the K shifts into the patch embeddings of all views; the rest of the ViT (positional
embedding, prefix tokens, blocks, final norm) runs on them through timm's own modules, in the
order ``forward_intermediates`` runs them, so the tokens equal ``Backbone.forward`` on the shifted
images. Options: mixed precision (autocast), torch.compile of the blocks, CUDA-graph capture for
fixed shapes; ``auto_view_batch`` sizes the view batches to the free GPU memory.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from fastsrt.backbone import Backbone, BackboneOutput, Layers
from fastsrt.checks import check_choice
from fastsrt.errors import warn_once
from fastsrt.ops.patch_embed import ShiftPatchEmbedOutput, embed_views, token_layout
from fastsrt.ops.shift import check_shifts_fit
from fastsrt.options import DTYPE_NAMES, PADDINGS, torch_dtype

DTYPES = (None, *(torch_dtype(name) for name in DTYPE_NAMES))  # None: no autocast, as float32
DEFAULT_VIEW_BATCH = 32  # images per backbone call where no GPU memory can be measured


def precision(device: torch.device, dtype: torch.dtype | None):
    """Autocast to dtype (bfloat16/float16) on the device, or nothing for None/float32. The autocast
    cache is off, as CUDA-graph capture requires."""
    check_choice("dtype", dtype, DTYPES)
    if dtype in (None, torch.float32):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def fused_views_unsupported(backbone) -> str | None:
    """Why the rest of this backbone cannot run from patch embeddings, or None if it can."""
    if not isinstance(backbone, Backbone):
        return f"a {type(backbone).__name__} is not a timm ViT"
    model = backbone.model
    if not isinstance(model, (VisionTransformer, Eva)):
        return f"timm {type(model).__name__} is neither a VisionTransformer nor an Eva"
    layout = token_layout(model.patch_embed)
    if layout not in ("NLC", "NHWC"):
        return f"its patch embedding writes {layout}, not tokens"
    return None


@dataclass
class FusedViewsOutput(BackboneOutput):
    """The views' tokens (and prefix tokens), and what embedded their patches: "fused" (the
    kernel), "reference" (its torch reference) or "patch_embed" (the model's own module)."""

    embedding_impl: str = ""


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    images: torch.Tensor  # static input, copied into before each replay
    output: FusedViewsOutput  # static outputs, cloned after each replay


class FusedViews:
    """Token grids of every shifted view of a batch, for a timm VisionTransformer or Eva.

    dtype: None or float32 (exact), bfloat16 or float16 (autocast, as the reference path uses it).
    compile: torch.compile the part after the patch embedding (blocks etc.) once per shape.
    cuda_graph: on CUDA, capture each (image shape, shifts, layers) call once as a CUDA graph and
    replay it (the shift kernel, positional embedding and blocks in one launch).
    The patch embeddings come from the fused kernel where it can run, else from its torch reference
    or, for embeddings that are not a plain convolution, the model's own patch_embed, with one
    warning (fastsrt.ops.patch_embed); every call returns which ran.
    """

    def __init__(self, backbone: Backbone, dtype: torch.dtype | None = None, compile: bool = False,
                 cuda_graph: bool = False):
        reason = fused_views_unsupported(backbone)
        if reason is not None:
            raise TypeError(f"the fused view path cannot run this backbone: {reason}")
        check_choice("dtype", dtype, DTYPES)
        self.backbone = backbone
        self.model = backbone.model
        self.dtype = dtype
        self.cuda_graph = cuda_graph
        self._rest = torch.compile(self._rest_of_vit, dynamic=False) if compile else self._rest_of_vit
        self._graphs: dict[tuple, _Graph] = {}
        self._graph_pool = None

    def __call__(self, images: torch.Tensor, shifts: Sequence[tuple[int, int]], padding: str = "zeros",
                 layers: Layers = -1, return_prefix: bool = False) -> FusedViewsOutput:
        """Tokens of the views: per layer (K*B, C, h, w), view-major (row k*B + b is image b shifted
        by shifts[k]), like ``backbone(shift_images(images, shifts, padding), layers)``."""
        images = self.backbone.prepare(images)
        check_choice("padding", padding, PADDINGS)
        check_shifts_fit(shifts, *images.shape[-2:])
        return self.run(images, shifts, padding, self.backbone.layer_indices(layers), return_prefix)

    def run(self, images, shifts, padding, layers: Sequence[int], return_prefix: bool) -> FusedViewsOutput:
        """``__call__`` without its checks: patch-multiple images, shifts that fit, absolute layer
        indices. Replays a CUDA graph when asked for and possible."""
        shifts, layers = [tuple(pair) for pair in shifts], tuple(layers)
        if self.cuda_graph and images.is_cuda:
            weights = next(self.model.parameters())  # a moved or cast model needs new graphs
            key = (tuple(images.shape), images.dtype, images.device, tuple(shifts), padding, layers, return_prefix,
                   weights.data_ptr(), weights.dtype)
            if key not in self._graphs:
                try:
                    self._graphs[key] = self._capture(images, shifts, padding, layers, return_prefix)
                except torch.cuda.OutOfMemoryError:
                    raise
                except RuntimeError as error:  # something in the model that a graph cannot hold
                    warn_once(f"CUDA-graph capture failed ({str(error).splitlines()[0][:120]}); running without graphs")
                    self.cuda_graph = False
                    self._graphs.clear()
                    return self.eager(images, shifts, padding, layers, return_prefix)
            return self._replay(self._graphs[key], images)
        return self.eager(images, shifts, padding, layers, return_prefix)

    def eager(self, images, shifts, padding, layers: Sequence[int], return_prefix: bool, shift_table=None,
              compiled: bool = True) -> FusedViewsOutput:
        """The un-graphed path, inputs as for ``run``; ``compiled=False`` skips torch.compile (for
        one-off calls such as memory probes, which would otherwise each compile a new shape)."""
        rest = self._rest if compiled else self._rest_of_vit
        with precision(images.device, self.dtype):
            embeddings, embedding_impl = self.embed(images, shifts, padding, shift_table)
            grid_size = (images.shape[-2] // self.backbone.patch_size, images.shape[-1] // self.backbone.patch_size)
            out = rest(embeddings, grid_size, tuple(layers), return_prefix)
        return FusedViewsOutput(out.tokens, out.prefix, embedding_impl)

    def embed(self, images, shifts, padding, shift_table=None) -> ShiftPatchEmbedOutput:
        """The patch embeddings of all views, in the layout ``model.patch_embed`` returns them, and
        the name of what computed them (fastsrt.ops.patch_embed chooses: the kernel where it can run)."""
        patch_embed = self.model.patch_embed
        embeddings, impl = embed_views(images, shifts, patch_embed, padding, self.dtype or images.dtype, "fused",
                                       shift_table)
        if token_layout(patch_embed) == "NLC":
            embeddings = embeddings.flatten(1, 2)
        return ShiftPatchEmbedOutput(embeddings, impl)

    def forward_embeddings(self, embeddings: torch.Tensor, grid_size: tuple[int, int], layers: Layers = -1,
                           return_prefix: bool = False) -> BackboneOutput:
        """The rest of the ViT from patch embeddings as ``model.patch_embed`` returns them
        ((N, h*w, D), or (N, h, w, D) for dynamic_img_size models); grid_size = (h, w)."""
        layers = tuple(self.backbone.layer_indices(layers))
        return self._rest_of_vit(embeddings, tuple(grid_size), layers, return_prefix)

    def _rest_of_vit(self, x: torch.Tensor, grid_size: tuple[int, int], layers: tuple[int, ...],
                     return_prefix: bool) -> BackboneOutput:
        # mirrors timm's forward_intermediates(norm=True, stop_early=True) after its patch_embed call
        model = self.model
        taken = sorted(set(layers))
        if isinstance(model, Eva):
            x, rope = model._pos_embed(x)  # Eva's _pos_embed applies its patch dropout too
            per_block_rope = getattr(model, "rope_mixed", False) and rope is not None
            x = model.norm_pre(x)
        else:
            x = model.norm_pre(model.patch_drop(model._pos_embed(x)))
        normed = {}
        for index, block in enumerate(model.blocks[: taken[-1] + 1]):
            if isinstance(model, Eva):
                x = block(x, rope=rope[index] if per_block_rope else rope)
            else:
                x = block(x)
            if index in taken:
                normed[index] = model.norm(x)
        prefix_count = self.backbone.num_prefix_tokens
        tokens = [normed[i][:, prefix_count:].unflatten(1, grid_size).permute(0, 3, 1, 2).contiguous() for i in layers]
        prefix = [normed[i][:, :prefix_count] for i in layers] if return_prefix else None
        return BackboneOutput(tokens=tokens, prefix=prefix)

    @staticmethod
    def _replay(entry: _Graph, images: torch.Tensor) -> FusedViewsOutput:
        entry.images.copy_(images)
        entry.graph.replay()
        # the static outputs are overwritten by the next replay: hand out copies
        return FusedViewsOutput(
            tokens=[t.clone() for t in entry.output.tokens],
            prefix=[p.clone() for p in entry.output.prefix] if entry.output.prefix is not None else None,
            embedding_impl=entry.output.embedding_impl,
        )

    def _capture(self, images, shifts, padding, layers, return_prefix) -> _Graph:
        with torch.cuda.device(images.device):  # streams and the capture belong to the images' GPU
            static_images = images.clone()
            shift_table = torch.tensor(shifts, dtype=torch.int32, device=images.device)  # no host copy in capture

            def views():
                return self.eager(static_images, shifts, padding, layers, return_prefix, shift_table)

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: Triton/compile JIT and cuBLAS workspaces outside the capture
                for _ in range(2):
                    views()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.empty_cache()  # the warm-up's cached blocks cannot serve the graph's private pool
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):  # graphs share one pool: replayed one at a time
                output = views()
        return _Graph(graph, static_images, output)


def auto_view_batch(run_views: Callable[[int], object], views: int, batch: int, kept_bytes_per_image: int,
                    device: torch.device, activation_copies: int = 1) -> int:
    """Images (views x batch) per backbone call that fit the free GPU memory.

    run_views(n) runs the first n views of the batch once. The memory of one more image is measured
    as the peak difference between a 1-view and a 4-view call; the batch is what fits 80% of the
    free memory after the fixed cost and the token grids kept for every view
    (kept_bytes_per_image each). ``activation_copies=2`` budgets for CUDA graphs, whose private
    pool holds a call's activations beside the allocator's. On CPU (nothing to measure):
    DEFAULT_VIEW_BATCH.
    """
    total = views * batch
    if device.type != "cuda":
        return DEFAULT_VIEW_BATCH
    probe = min(4, views)
    if probe == 1:
        return total
    peaks = []
    for count in (1, probe):
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            run_views(count)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - before)
    per_image = activation_copies * max((peaks[1] - peaks[0]) / ((probe - 1) * batch), 1.0)
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    budget = 0.8 * free - peaks[0] - kept_bytes_per_image * total
    return int(max(batch, min(total, budget // per_image)))
