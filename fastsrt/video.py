"""Video files in and out, through PyAV.

PyAV's wheels carry their own FFmpeg (H.264, HEVC, VP9, AV1, MPEG-4... decoders and encoders), so
``pip install av`` is the whole install on any machine; torchcodec would need a system FFmpeg of a
matching major version and a torch of its own release. PyAV is imported when a video is first
opened: fastsrt works without it for images.

``read_video`` yields frames as (3, H, W) float tensors in [0, 1] (like ``fastsrt.io.load_image``)
with their index and time, upright (a phone's rotation metadata applied), optionally subsampled
(every N-th frame, or F frames per second of video time). A file that cannot be opened, or whose
decoding breaks off, raises ``VideoReadError`` naming the frames read before it and the reason.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from fastsrt.errors import Unavailable
from fastsrt.io import ImageReadError, atomic_path

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".gif")


def require_av():
    try:
        import av
    except ImportError:
        raise Unavailable("reading videos needs PyAV: pip install av (or fastsrt[video])") from None
    return av


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


class VideoReadError(ImageReadError):
    """A video that cannot be opened or decoded to its end: names the file, how many frames were
    read before the failure, and the reason. An ImageReadError, so folder jobs report it by name
    and go on."""

    def __init__(self, path, frames_read: int, reason: str):
        super().__init__(path, f"{reason} ({frames_read} frame(s) read)", kind="video")
        self.frames_read, self.reason = frames_read, reason


@dataclass(frozen=True)
class VideoInfo:
    width: int  # as stored (before rotation)
    height: int
    fps: float  # the stream's average frame rate (0 where unknown)
    frames: int  # as the container declares it (0 where unknown)
    duration: float  # seconds (0 where unknown)
    codec: str


@dataclass
class VideoFrame:
    index: int  # position among the decoded frames, from 0
    time: float  # presentation time in seconds
    image: torch.Tensor  # (3, H, W) float32 in [0, 1], upright


def _open(path: Path):
    av = require_av()
    if not path.is_file():
        raise VideoReadError(path, 0, "no such file" if not path.exists() else "not a file")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise VideoReadError(path, 0, f"not a readable video ({reason})") from None
    if not container.streams.video:
        container.close()
        raise VideoReadError(path, 0, "the file has no video stream")
    return container


def _duration(container, stream) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / 1_000_000 if container.duration else 0.0  # in AV_TIME_BASE units (microseconds)


def _declared_frames(container, stream) -> int:
    """The frame count the container states, or its duration x frame rate (Matroska, WebM); 0 if neither."""
    rate = float(stream.average_rate or 0)
    return stream.frames or round(_duration(container, stream) * rate)


def probe(path: str | os.PathLike) -> VideoInfo:
    """The video stream's size, frame rate, declared frame count and duration, without decoding."""
    with _open(Path(path)) as container:
        stream = container.streams.video[0]
        return VideoInfo(stream.codec_context.width, stream.codec_context.height, float(stream.average_rate or 0),
                         _declared_frames(container, stream), _duration(container, stream), stream.codec_context.name)


def _upright(frame) -> np.ndarray:
    """The frame as an (H, W, 3) uint8 RGB array, turned by its display rotation (degrees
    counter-clockwise, as phones record it)."""
    pixels = frame.to_ndarray(format="rgb24")
    turns = round(getattr(frame, "rotation", 0) or 0) // 90 % 4
    return np.ascontiguousarray(np.rot90(pixels, k=turns)) if turns else pixels


def check_subsampling(every: int = 1, fps: float | None = None) -> None:
    """ValueError naming the value unless ``every`` is an int >= 1 and ``fps`` None or a positive
    finite number, not both given."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an int >= 1, got {every!r}")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps)
                            or fps <= 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if fps is not None and every != 1:
        raise ValueError(f"give every or fps, not both (every={every}, fps={fps})")


def read_video(path: str | os.PathLike, every: int = 1, fps: float | None = None) -> Iterator[VideoFrame]:
    """Decodes ``path`` frame by frame. ``every``: keep frames 0, N, 2N... ; ``fps``: keep the first
    frame at or after each multiple of 1/fps seconds (of the first frame's time). A decoding error
    or a stream that ends short of its declared frame count raises VideoReadError after the frames
    read so far were yielded. Bad ``every``/``fps`` raise at once; the file is opened at the first
    frame asked for."""
    check_subsampling(every, fps)
    return _decode(Path(path), every, fps)


def _decode(path: Path, every: int, fps: float | None) -> Iterator[VideoFrame]:
    av = require_av()
    container = _open(path)
    index = -1
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame- and slice-threaded decoding
        declared, start, next_time = _declared_frames(container, stream), None, 0.0
        try:
            for index, frame in enumerate(container.decode(stream)):
                time = float(frame.time) if frame.time is not None else index / float(stream.average_rate or 1)
                start = time if start is None else start
                if fps is not None:
                    if time - start + 1e-6 < next_time:
                        continue
                    # the next multiple of 1/fps after this frame: a gap in the timestamps (variable frame
                    # rate) is not followed by a burst of frames catching up
                    next_time = (math.floor((time - start) * fps + 1e-6) + 1) / fps
                elif index % every:
                    continue
                image = torch.from_numpy(_upright(frame)).permute(2, 0, 1).float().div_(255)
                yield VideoFrame(index, time, image)
        except av.error.FFmpegError as error:
            raise VideoReadError(path, index + 1, str(error)) from None
        if index < 0:
            raise VideoReadError(path, 0, "no frame could be decoded")
        if declared and index + 1 < declared * 0.98:  # a truncated file: FFmpeg stops quietly at the cut
            raise VideoReadError(path, index + 1, f"the stream ends short of its {declared} frames (truncated?)")
    finally:
        container.close()


CONTAINER_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}


class VideoWriter:
    """Encodes (H, W, 3) uint8 RGB frames one by one into ``path`` (its format from the suffix; H
    and W even for yuv420p codecs), atomically: the file appears under its name when the ``with``
    block ends without an error, and an error or interruption leaves nothing behind
    (fastsrt.io.atomic_path). ``quality``: the encoder's CRF where it has one. ``count``: the
    frames written so far."""

    def __init__(self, path: str | os.PathLike, fps: float, codec: str = "libx264", quality: int = 23):
        self.path = Path(path)
        if self.path.suffix.lower() not in CONTAINER_FORMATS:
            raise ValueError(f"cannot tell the container format of {str(self.path)!r}: use one of "
                             f"{', '.join(CONTAINER_FORMATS)}")
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps!r}")
        self.fps, self.codec, self.quality = fps, codec, quality
        self.count = 0
        self._av = self._stream = self._out = self._closing = None

    def __enter__(self) -> VideoWriter:
        av = require_av()
        with contextlib.ExitStack() as stack:
            temporary = stack.enter_context(atomic_path(self.path))
            self._out = stack.enter_context(av.open(str(temporary), "w",
                                                    format=CONTAINER_FORMATS[self.path.suffix.lower()]))
            self._closing = stack.pop_all()  # closes the container, then renames or removes the temporary
        self._av = av
        return self

    def write(self, pixels: np.ndarray) -> None:
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise ValueError(f"frames must be (H, W, 3) uint8 arrays, got {pixels.dtype} {pixels.shape}")
        if self._stream is None:  # the first frame sets the size
            self._stream = self._out.add_stream(self.codec, rate=Fraction(self.fps).limit_denominator(1001))
            self._stream.pix_fmt = "yuv420p"
            if self.codec in ("libx264", "libx265", "libvpx-vp9"):
                self._stream.options = {"crf": str(self.quality)}
            self._stream.height, self._stream.width = pixels.shape[:2]
        elif pixels.shape[:2] != (self._stream.height, self._stream.width):
            raise ValueError(f"frame {self.count} is {pixels.shape[1]} x {pixels.shape[0]}, the video "
                             f"{self._stream.width} x {self._stream.height}")
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
        self._out.mux(self._stream.encode(frame))
        self.count += 1

    def __exit__(self, *raised) -> bool:
        if raised[0] is None:
            try:
                if self._stream is None:
                    raise ValueError(f"no frames to write to {str(self.path)!r}")
                self._out.mux(self._stream.encode())  # flushes the encoder's delayed frames
            except BaseException:
                if not self._closing.__exit__(*sys.exc_info()):
                    raise
                return False
        return self._closing.__exit__(*raised)


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float, codec: str = "libx264",
                quality: int = 23) -> int:
    """Encodes (H, W, 3) uint8 RGB frames into ``path`` at once (see VideoWriter). Returns the number
    of frames written."""
    with VideoWriter(path, fps, codec, quality) as writer:
        for pixels in frames:
            writer.write(pixels)
    return writer.count
