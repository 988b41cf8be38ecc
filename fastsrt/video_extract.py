"""Feature extraction from one video: frames decoded (fastsrt.video), batched through SRT, one
safetensors file of every kept frame's raw and SRT features, and a preview video.

Output of ``extract_video`` for ``clip.mp4`` in ``OUT``:

- ``OUT/clip.safetensors``: "raw" (T, C, h, w) and "srt" (T, C, h, w), or (T, C, H, W) with
  ``output="pixel"``, in ``store_dtype``; "times" (T,) float64 seconds and "indices" (T,) int64,
  the kept frames' presentation times and positions among the decoded frames; the settings as
  metadata, with ``complete: true``.
- ``OUT/clip.preview.mp4``: input | raw | SRT per kept frame, coloured by one PCA basis fitted on
  the first frames (``PREVIEW_FIT_FRAMES``), so colours mean the same features all through.

A video whose decoding breaks off (a truncated or damaged file) leaves no file under those names,
so nothing incomplete looks finished and a rerun tries it again. The features of the frames read
before the break go to ``OUT/clip.partial.safetensors``, marked ``complete: false`` with the frames
read and the reason; a later complete run removes it.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fastsrt.backbone_fused import DEFAULT_VIEW_BATCH, precision
from fastsrt.io import ImageReadError, load_metadata, normalize, resize_to_patch_multiple, save_tensors
from fastsrt.options import DTYPE_NAMES, OUTPUTS, torch_dtype
from fastsrt.srt import SRT
from fastsrt.video import (
    VideoFrame,
    VideoInfo,
    VideoReadError,
    VideoWriter,
    check_subsampling,
    probe,
    read_video,
)
from fastsrt.viz import PCABasis, fit_pca, side_by_side, to_uint8_image

PREVIEW_FIT_FRAMES = 8  # the preview's PCA colours are fitted on the features of this many first frames
PREVIEW_FALLBACK_FPS = 25.0  # the preview's frame rate when the video states none


@dataclass
class VideoSettings:
    """How videos are extracted. every: keep frames 0, N, 2N...; fps: keep about F frames per second
    of video time (not both); output: "token" (the token grid) or "pixel" (SRT at the resized
    frame's resolution; raw stays at the token grid); store_dtype: the stored features' precision
    (the backbone's is SRT's dtype); frame_batch: frames per SRT call, "auto" as many as fill
    SRT's view_batch with all their views; preview: write the preview video; max_bytes: refuse a
    video whose features would take more (they are held in memory until written)."""

    every: int = 1
    fps: float | None = None
    output: str = "token"
    store_dtype: str = "float16"
    frame_batch: int | str = "auto"
    preview: bool = True
    max_bytes: int = 8_000_000_000

    def __post_init__(self):
        check_subsampling(self.every, self.fps)
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")
        if self.store_dtype not in DTYPE_NAMES:
            raise ValueError(f"store_dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.store_dtype!r}")
        if self.frame_batch != "auto" and (isinstance(self.frame_batch, bool) or not isinstance(self.frame_batch, int)
                                           or self.frame_batch < 1):
            raise ValueError(f"frame_batch must be an int >= 1 or 'auto', got {self.frame_batch!r}")
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise ValueError(f"max_bytes must be an int >= 1, got {self.max_bytes!r}")


def output_paths(out_dir: str | Path, stem: str) -> tuple[Path, Path, Path]:
    """The features, preview and partial-features files of the video ``stem``."""
    out_dir = Path(out_dir)
    return (out_dir / f"{stem}.safetensors", out_dir / f"{stem}.preview.mp4",
            out_dir / f"{stem}.partial.safetensors")


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a finished features file: its header reads and says so (a file of an
    image, without the mark, counts as finished too)."""
    try:
        return load_metadata(path).get("complete", True) is True
    except Exception:  # missing, or no safetensors header: not finished
        return False


def expected_frames(info: VideoInfo, every: int = 1, fps: float | None = None) -> int:
    """How many frames read_video keeps from a video of ``info``: exact for ``every``, within one for
    ``fps``; 0 where the video does not state its length."""
    if not info.frames:
        return 0
    if fps is not None:
        if not info.fps:
            return 0
        return min(info.frames, math.floor((info.frames - 1) / info.fps * fps + 1e-6) + 1)
    return math.ceil(info.frames / every)


def frames_per_call(srt: SRT, frame_batch: int | str) -> int:
    """``frame_batch``, or for "auto" the frames whose views fill one SRT view_batch (the CPU's
    default view batch where SRT sizes it from GPU memory), at least one."""
    if frame_batch != "auto":
        return frame_batch
    view_batch = DEFAULT_VIEW_BATCH if srt.view_batch == "auto" else srt.view_batch
    return max(1, view_batch // srt.views_to_run)


def _with_output(srt: SRT, output: str) -> SRT:
    """``srt`` giving ``output`` ("token" or "pixel"): the same module (backbone, caches), another
    aggregation."""
    if srt.output == output:
        return srt
    other = copy.copy(srt)  # shares the backbone and every buffer; only the attribute below differs
    other.output = output
    return other


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _batches(frames, size: int):
    """Lists of up to ``size`` frames. A VideoReadError of ``frames`` is raised after the frames read
    before it were yielded."""
    batch = []
    try:
        for frame in frames:
            batch.append(frame)
            if len(batch) == size:
                yield batch
                batch = []
    except VideoReadError:
        if batch:
            yield batch
        raise
    if batch:
        yield batch


class _Preview:
    """Writes the preview's frames: the first PREVIEW_FIT_FRAMES wait until the PCA basis is fitted
    on their features, the rest are written as they come."""

    def __init__(self, writer: VideoWriter):
        self.writer, self.basis, self.pending = writer, None, []

    def add(self, image: torch.Tensor, raw: torch.Tensor, features: torch.Tensor) -> None:
        self.pending.append((image, raw, features))
        if self.basis is None and len(self.pending) < PREVIEW_FIT_FRAMES:
            return
        self.flush()

    def flush(self) -> None:
        if self.basis is None and self.pending:  # fitted at the token grid: cheap at any output size
            maps = [m for _, raw, features in self.pending for m in (raw, features)]
            self.basis = fit_pca(maps, size=tuple(self.pending[0][1].shape[-2:]))
        for image, raw, features in self.pending:
            self.writer.write(preview_frame(self.basis, image, raw, features))
        self.pending = []


def preview_frame(basis: PCABasis, image: torch.Tensor, raw: torch.Tensor, features: torch.Tensor) -> np.ndarray:
    """Input | raw | SRT as one (H', W', 3) uint8 frame with even sides (what yuv420p encodes)."""
    size = tuple(image.shape[-2:])
    panels = [to_uint8_image(image), basis.colors(raw, size), basis.colors(features, size)]
    picture = np.asarray(side_by_side(panels, ["input", "raw ViT features", "SRT features"], height=size[0]))
    return picture[: picture.shape[0] // 2 * 2, : picture.shape[1] // 2 * 2]  # drops a white margin line


def extract_video(srt: SRT, path: Path, out_dir: str | Path, short_side: int, settings: VideoSettings,
                  metadata: dict, progress: bool = True) -> int:
    """Writes the features (and preview) of the video ``path`` into ``out_dir`` (module doc); returns
    the number of frames. Raises VideoReadError for a video that cannot be read to its end (after
    writing the partial features, if any frame was read), ImageReadError for one over
    ``settings.max_bytes``."""
    if isinstance(srt.layer, (list, tuple)):
        raise ValueError("feature extraction takes one layer; got several")
    features_path, preview_path, partial_path = output_paths(out_dir, path.stem)
    info = probe(path)
    video_srt = _with_output(srt, settings.output)
    store = torch_dtype(settings.store_dtype)
    device = next(srt.backbone.parameters(), torch.empty(0)).device
    expected = expected_frames(info, settings.every, settings.fps)
    preview_fps = settings.fps or (info.fps / settings.every if info.fps else PREVIEW_FALLBACK_FPS)
    raws, features, times, indices, views = [], [], [], [], []
    stored_bytes = 0
    bar = tqdm(total=expected or None, desc=path.name, unit="frame", leave=False, disable=not progress)
    try:
        with contextlib.ExitStack() as stack:
            preview = None
            if settings.preview:
                preview = _Preview(stack.enter_context(VideoWriter(preview_path, preview_fps)))
            frames = read_video(path, settings.every, settings.fps)
            for batch in _batches(frames, frames_per_call(srt, settings.frame_batch)):
                images, inputs, raw = _raw_features(video_srt, batch, short_side, device)
                if not raws:  # before the first SRT call
                    _check_size(path, images, raw, expected, settings, store)
                    image_size = tuple(images.shape[-2:])
                out = video_srt.run(inputs)  # fewer than all views where SRT has max_views or budget_ms
                srt_features = out.features
                raw, srt_features = _stored(raw, store), _stored(srt_features, store)
                stored_bytes += (raw.numel() + srt_features.numel()) * raw.element_size()
                if stored_bytes > settings.max_bytes:
                    raise ImageReadError(path, f"its features pass --max-bytes {settings.max_bytes} "
                                               f"({_human(settings.max_bytes)}) at frame {batch[-1].index}", "video")
                raws.append(raw)
                features.append(srt_features)
                times += [frame.time for frame in batch]
                indices += [frame.index for frame in batch]
                views += [out.views_done] * len(batch)
                if preview is not None:
                    for image, r, s in zip(images, raw, srt_features):
                        preview.add(image, r, s)
                bar.update(len(batch))
            if preview is not None:
                preview.flush()
    except VideoReadError as error:
        if indices:
            _save(partial_path, raws, features, times, indices, views, {
                **metadata, **_video_metadata(path, info, settings, short_side, image_size), "complete": False,
                "frames_read": error.frames_read, "reason": error.reason})
            raise VideoReadError(path, error.frames_read, f"{error.reason}; the features of the {len(indices)} "
                                 f"frame(s) before it are in {str(partial_path)!r}, marked incomplete") from None
        raise
    finally:
        bar.close()
    _save(features_path, raws, features, times, indices, views,
          {**metadata, **_video_metadata(path, info, settings, short_side, image_size), "complete": True})
    partial_path.unlink(missing_ok=True)  # an earlier run's partial result, now superseded
    return len(indices)


def _raw_features(srt: SRT, batch: list[VideoFrame], short_side: int, device: torch.device):
    """The frames as fed (B, 3, H, W) in [0, 1], normalised on the device, and their raw token grids
    (B, C, h, w): one plain forward."""
    images = torch.stack([resize_to_patch_multiple(frame.image, short_side, srt.patch_size) for frame in batch])
    inputs = normalize(images, srt.backbone.mean, srt.backbone.std).to(device)
    with torch.no_grad(), precision(device, srt.dtype):
        return images, inputs, srt.backbone(inputs, srt.layer).tokens[0]


def _stored(values: torch.Tensor, store: torch.dtype) -> torch.Tensor:
    """``values`` in the storage dtype, on the CPU; an error where they exceed its range."""
    stored = values.to(store).cpu()
    if store != values.dtype and torch.isinf(stored).any() and not torch.isinf(values).any():
        raise ValueError(f"the features exceed the range of {str(store).removeprefix('torch.')} "
                         f"(largest magnitude {values.abs().max().item():.4g}): store them as float32")
    return stored


def _check_size(path: Path, images: torch.Tensor, raw: torch.Tensor, expected: int, settings: VideoSettings,
                store: torch.dtype) -> None:
    """Says what pixel-resolution output will take, before it is computed, and refuses a video whose
    features (for the length it states) would pass ``max_bytes``. The SRT features are counted with
    the raw features' channels."""
    channels, grid = raw.shape[1], tuple(raw.shape[-2:])
    side = grid if settings.output == "token" else tuple(images.shape[-2:])
    per_frame = channels * (grid[0] * grid[1] + side[0] * side[1]) * store.itemsize
    total = per_frame * expected
    if settings.output == "pixel":
        length = f"{expected} frames" if expected else "a length the video does not state"
        tqdm.write(f"fastsrt: {path.name}: pixel-resolution SRT features, {channels} x {side[0]} x {side[1]} "
                   f"{settings.store_dtype} a frame with the raw ones, {length}: {_human(total)}")
    if total > settings.max_bytes:
        raise ImageReadError(path, f"its features would take {_human(total)} ({expected} frames x {per_frame} bytes), "
                                   f"over --max-bytes {settings.max_bytes} ({_human(settings.max_bytes)}): keep fewer "
                                   "frames (--every, --fps), store token output, or raise --max-bytes", "video")


def _video_metadata(path: Path, info: VideoInfo, settings: VideoSettings, short_side: int,
                    image_size: tuple[int, int]) -> dict:
    return {"source": str(path), "kind": "video", "video": asdict(info), "every": settings.every,
            "fps": settings.fps, "output": settings.output, "store_dtype": settings.store_dtype,
            "short_side": short_side, "image_size": list(image_size)}


def _save(path: Path, raws, features, times, indices, views, metadata: dict) -> None:
    tensors = {"raw": torch.cat(raws), "srt": torch.cat(features), "times": torch.tensor(times, dtype=torch.float64),
               "indices": torch.tensor(indices, dtype=torch.int64),
               "views_done": torch.tensor(views, dtype=torch.int64)}
    save_tensors(path, tensors, {**metadata, "frames": len(indices)})
