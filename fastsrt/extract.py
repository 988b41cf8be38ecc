"""Feature extraction jobs: image and video files in, SRT feature files (and pictures, preview
videos) out; videos through fastsrt.video_extract.

A folder run never loses finished work: each output is written atomically, inputs whose output
exists are skipped (resume), and an input that fails (it cannot be read, or computing its features
runs out of memory: ``IMAGE_FAILURES``) is reported while the others are written. What would fail
every image the same way ends the run: what cannot run here, a bad setting, an error while writing
to the output folder, Ctrl-C.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from fastsrt.backbone import model_name
from fastsrt.backbone_fused import precision
from fastsrt.dvt.distributed import rank_and_world_size
from fastsrt.errors import Unavailable
from fastsrt.io import (
    IMAGE_EXTENSIONS,
    IMAGE_FAILURES,
    JobReport,
    check_max_pixels,
    check_unique_stems,
    list_images,
    load_image,
    normalize,
    resize_to_patch_multiple,
    save_png,
    save_tensors,
)
from fastsrt.options import MAX_PIXELS
from fastsrt.srt import SRT
from fastsrt.video import VIDEO_SUFFIXES, is_video
from fastsrt.video_extract import VideoSettings, extract_video, is_complete
from fastsrt.viz import heat_colors, pca_colors, side_by_side, to_uint8_image


@dataclass
class ImageFeatures:
    image: torch.Tensor  # (3, H, W) in [0, 1], as fed to the model (before normalisation)
    raw: torch.Tensor  # (C, h, w): one plain forward
    srt: torch.Tensor  # (C, H, W) or (C, h, w): SRT
    noise: torch.Tensor  # (H, W) or (h, w): norm over channels of the std across views
    seconds: dict[str, float]
    impl: str  # what SRT ran (SRTOutput.impl), e.g. "fused" or "reference views + chunked aggregation"
    views_done: int  # all of srt.shifts, or fewer where SRT has max_views or budget_ms


def features_of(srt: SRT, image: torch.Tensor, short_side: int) -> ImageFeatures:
    """Raw and SRT features of one (3, H, W) image in [0, 1], resized to a patch multiple."""
    if isinstance(srt.layer, (list, tuple)):
        raise ValueError("feature extraction takes one layer; got several")
    device = next(srt.backbone.parameters(), torch.empty(0)).device
    image = resize_to_patch_multiple(image, short_side, srt.patch_size)
    batch = normalize(image, srt.backbone.mean, srt.backbone.std)[None].to(device)
    seconds = {}
    start = _now(device)
    with torch.no_grad(), precision(device, srt.dtype):
        raw = srt.backbone(batch, srt.layer).tokens[0][0]
    seconds["raw forward"] = _now(device) - start
    start = _now(device)
    out = srt.run(batch, std=True)
    seconds[f"SRT ({out.views_done} views)"] = _now(device) - start
    return ImageFeatures(image=image, raw=raw.cpu(), srt=out.features[0].cpu(), noise=out.std[0].norm(dim=0).cpu(),
                         seconds=seconds, impl=out.impl, views_done=out.views_done)


def _now(device: torch.device) -> float:
    """A wall-clock reading after the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def comparison_picture(result: ImageFeatures) -> Image.Image:
    """Image | raw features | SRT features | SRT noise: the features as one joint PCA colour map,
    the noise (spread of the views, the SRT paper's Fig. 4) as a heat map."""
    size = tuple(result.image.shape[-2:])
    raw_rgb, srt_rgb = pca_colors([result.raw, result.srt], size=size)
    noise = F.interpolate(result.noise[None, None], size=size, mode="nearest")[0, 0]
    return side_by_side(
        [to_uint8_image(result.image), raw_rgb, srt_rgb, heat_colors(noise)],
        ["image", "raw ViT features", "SRT features", "SRT noise (std over views)"],
    )


def extract(inputs, out_dir: str | os.PathLike, srt: SRT, short_side: int = 448, overwrite: bool = False,
            picture: bool = True, progress: bool = True, max_pixels: int = MAX_PIXELS,
            video: VideoSettings | None = None, rank: int | None = None, world_size: int | None = None) -> JobReport:
    """For every image in ``inputs`` (files or folders): ``OUT/<stem>.safetensors`` with tensors
    "raw" (C, h, w) and "srt" and, with ``picture``, ``OUT/<stem>.png``. Images of more than
    ``max_pixels`` pixels are refused (``load_image``). For every video: the features of its frames
    (fastsrt.video_extract, ``video`` settings). Under torchrun (or with ``rank`` and ``world_size``)
    this process takes the inputs ``rank::world_size`` of the list, so the processes share them out,
    each input to one; the report is this process's (``gather_reports`` merges them)."""
    check_max_pixels(max_pixels)
    video = VideoSettings() if video is None else video
    rank, world_size = rank_and_world_size(rank, world_size)
    paths = list_images(inputs, IMAGE_EXTENSIONS + VIDEO_SUFFIXES, "images or videos")
    check_unique_stems(paths)
    paths = paths[rank::world_size]
    out_dir = Path(out_dir)
    report = JobReport()
    metadata = {"model": model_name(srt.backbone), "layer": srt.layer, "shifts": srt.shifts,
                "upsample": srt.upsample, "padding": srt.padding, "reduce": srt.reduce,
                "ignore_padding": srt.ignore_padding, "output": srt.output,
                "patch_size": srt.patch_size, "dtype": str(srt.dtype or torch.float32).removeprefix("torch.")}
    if srt.token_transform is not None:  # e.g. a DVT denoiser applied to every view (fastsrt extract --denoiser)
        metadata["token_transform"] = getattr(srt.token_transform, "config", type(srt.token_transform).__name__)
    label = f"extract (rank {rank}/{world_size})" if world_size > 1 else "extract"
    for path in tqdm(paths, desc=label, unit="file", disable=not progress):
        target = out_dir / f"{path.stem}.safetensors"
        if not overwrite and (is_complete(target) if is_video(path) else target.exists()):
            report.skipped.append(path)
            continue
        try:
            if is_video(path):
                extract_video(srt, path, out_dir, short_side, video, metadata, progress)
            else:
                result = features_of(srt, load_image(path, max_pixels), short_side)
        except Unavailable:
            raise
        except IMAGE_FAILURES as error:  # this input's failure (module doc)
            report.fail(path, error)
            continue
        if not is_video(path):
            if picture:
                save_png(target.with_suffix(".png"), comparison_picture(result))
            save_tensors(target, {"raw": result.raw, "srt": result.srt, "noise": result.noise},
                         {**metadata, "source": str(path), "views_done": result.views_done})
        report.written.append(path)
    return report



def gather_reports(report: JobReport, rank: int | None = None, world_size: int | None = None) -> JobReport | None:
    """Under torchrun: every process's report merged, on rank 0, once all have finished (None on
    the other ranks); outside it, ``report``. The processes meet through a gloo group (torchrun's
    rendezvous variables) that waits as long as the slowest shard takes."""
    rank, world_size = rank_and_world_size(rank, world_size)
    if world_size == 1:
        return report
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    try:
        reports = [None] * world_size if rank == 0 else None
        dist.gather_object(report, reports, dst=0)
    finally:
        if own_group:
            dist.destroy_process_group()
    if rank != 0:
        return None
    return JobReport(written=[p for r in reports for p in r.written], skipped=[p for r in reports for p in r.skipped],
                     failed=[f for r in reports for f in r.failed])
