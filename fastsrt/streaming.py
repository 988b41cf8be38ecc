"""SRT on a stream of frames: a camera driver's generator, a list of frames, or a video file.

``fastsrt.stream(frames, srt, batch=4)`` returns a ``Stream``; iterating it yields one
``StreamItem`` per frame, in order. A background thread takes the frames from the source (a
video is decoded there), turns them into the model's input (resized and normalised as
``fastsrt extract`` does) and, on a GPU, copies them from pinned host memory on a side CUDA
stream, recording an event the compute stream waits on: decoding, conversion and copies overlap
the GPU's work on the batches before. On the CPU the thread does the decoding and conversion.

Back-pressure: at most ``prefetch`` + 1 batches are taken from the source and not yet yielded,
so a fast source is not drained into memory and a camera's frames are not piled up behind a
slow model. An exception from the source (or from converting one of its frames) ends the
iteration with that exception, after the frames taken before it have been yielded. Leaving the
loop early (``break``, an exception in the loop body) stops the thread and closes the source.
"""
from __future__ import annotations

import os
import queue
import threading
import time
import weakref
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fastsrt.io import normalize, resize_to_patch_multiple, to_rgb_tensor
from fastsrt.srt import SRT
from fastsrt.video import VideoFrame, read_video

POLL_SECONDS = 0.05  # how often a waiting thread looks whether the stream was closed
JOIN_SECONDS = 5.0  # how long closing waits for the thread (it may be inside the source's next())
FRAME_TYPES = ("numpy (H, W, 3), PIL image, torch tensor (3, H, W) or (H, W, 3), uint8 or float in [0, 1], "
               "or fastsrt.video.VideoFrame")


@dataclass
class StreamItem:
    """One frame's result. features: the SRT output of this frame as ``srt.output`` says, (C, H, W)
    for "pixel" or (C, h, w) for "token" (a list of those, one per layer, for several layers), on
    the SRT's device. index: the frame's number in its source (a video's frame number: with
    ``every``/``fps`` not every number appears); time: its presentation time in seconds for
    videos, None for other sources; latency: seconds from the frame being taken from the source to
    this result being ready (the GPU synchronised)."""

    index: int
    time: float | None
    features: torch.Tensor | list[torch.Tensor]
    latency: float


@dataclass(frozen=True)
class StreamStats:
    """frames yielded; seconds from the start of the iteration to the last result; latency
    percentiles in seconds (NaN before the first frame); waited: seconds the consumer spent
    waiting for the producer thread's next batch (decoding, conversion, copies): a large share of
    ``seconds`` means the source, not the model, sets the pace."""

    frames: int
    seconds: float
    frames_per_second: float
    latency_p50: float
    latency_p95: float
    latency_p99: float
    waited: float

    def __str__(self) -> str:
        return (f"{self.frames} frames in {self.seconds:.3g} s ({self.frames_per_second:.3g} frames/s); latency "
                f"p50 {1e3 * self.latency_p50:.3g} ms, p95 {1e3 * self.latency_p95:.3g} ms, p99 "
                f"{1e3 * self.latency_p99:.3g} ms; waited on the source {self.waited:.3g} s")


def stream(frames, srt: SRT, batch: int = 1, prefetch: int = 2, short_side: int | None = None,
           size: tuple[int, int] | None = None, every: int = 1, fps: float | None = None) -> Stream:
    """SRT results of ``frames``, one ``StreamItem`` per frame, in order (module doc).

    Args:
        frames: an iterable of frames (FRAME_TYPES), e.g. a camera driver's generator, or the path
            of a video file (decoded by fastsrt.video.read_video, with ``every`` and ``fps``).
        srt: a fastsrt.SRT; its ``output`` option decides pixel- or token-resolution results.
        batch: frames per SRT call (the last batch may be smaller).
        prefetch: batches prepared ahead of the one the model works on.
        short_side: resize each frame so that its shorter side is about this many pixels and both
            sides are patch multiples (as ``fastsrt extract``); ``size``: resize to exactly
            (H, W); neither: frames go in at their own size. All frames of a stream must end up
            the same size.
    """
    return Stream(frames, srt, batch, prefetch, short_side, size, every, fps)


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class Stream:
    """Iterable once; ``stats()`` at any time (StreamStats). Made by ``fastsrt.stream``."""

    def __init__(self, frames, srt: SRT, batch: int = 1, prefetch: int = 2, short_side: int | None = None,
                 size: tuple[int, int] | None = None, every: int = 1, fps: float | None = None):
        if not isinstance(srt, SRT):
            raise TypeError(f"srt must be a fastsrt.SRT, got {type(srt).__name__} (for a fastsrt.DVT with shifts, "
                            f"pass its .srt)")
        _positive_int("batch", batch)
        _positive_int("prefetch", prefetch)
        if short_side is not None and size is not None:
            raise ValueError("give short_side or size, not both")
        if short_side is not None:
            _positive_int("short_side", short_side)
        if size is not None:
            if not (isinstance(size, (tuple, list)) and len(size) == 2):
                raise ValueError(f"size must be (height, width), got {size!r}")
            for side in size:
                _positive_int("size's sides", side)
            size = (int(size[0]), int(size[1]))
        if isinstance(frames, (str, os.PathLike)):
            self.source = read_video(frames, every=every, fps=fps)  # checks every/fps; opens the file when iterated
        elif every != 1 or fps is not None:
            raise ValueError("every and fps subsample a video file; frames is not a path")
        elif isinstance(frames, Iterable):
            self.source = iter(frames)
        else:
            raise TypeError(f"frames must be an iterable of frames or a video path, got {type(frames).__name__}")
        self.srt, self.batch, self.prefetch = srt, batch, prefetch
        self.device = next(srt.backbone.parameters(), torch.empty(0)).device
        self.convert = _Conversion(self.device, srt.patch_size, srt.backbone.mean, srt.backbone.std, short_side, size)
        self._started = False
        self._generator = lambda: None  # a weak reference to the running generator, for close()
        self._latencies = array("d")
        self._start = self._end = None
        self._waited = 0.0

    def __iter__(self) -> Iterator[StreamItem]:
        if self._started:
            raise RuntimeError("a stream is iterated once; make a new one with fastsrt.stream(...)")
        self._started = True
        generator = self._results()
        self._generator = weakref.ref(generator)  # not a strong one: leaving the loop closes the generator
        return generator

    def close(self) -> None:
        """Stops the thread and closes the source now (as leaving the loop does)."""
        generator = self._generator()
        if generator is not None:
            generator.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> StreamStats:
        frames = len(self._latencies)
        seconds = (self._end - self._start) if frames else 0.0
        if frames:
            p50, p95, p99 = np.percentile(np.frombuffer(self._latencies, dtype=np.float64), (50, 95, 99)).tolist()
        else:
            p50 = p95 = p99 = float("nan")
        rate = frames / seconds if seconds > 0 else 0.0
        return StreamStats(frames, seconds, rate, p50, p95, p99, self._waited)

    def _results(self) -> Iterator[StreamItem]:
        self._start = time.perf_counter()
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        producer = _Producer(self.source, self.convert, self.batch, self.prefetch, side)
        producer.start()
        try:
            running = None  # a batch the GPU works on, not yet yielded
            while True:
                if running is not None and producer.batches.empty():  # nothing to queue behind it: its results first
                    yield from self._finish(running, producer)
                    running = None
                message = self._next_message(producer)
                if isinstance(message, _Batch):
                    submitted = self._submit(message)
                    if running is not None:
                        yield from self._finish(running, producer)
                    running = submitted
                    if side is None:  # the CPU computed it already: no reason to hold it back
                        yield from self._finish(running, producer)
                        running = None
                    continue
                if running is not None:
                    yield from self._finish(running, producer)
                if message is _END:
                    return
                raise message  # the source's own exception, after the frames taken before it
        finally:
            producer.stop()

    def _next_message(self, producer: _Producer):
        start = time.perf_counter()
        while True:
            try:
                message = producer.batches.get(timeout=POLL_SECONDS)
                break
            except queue.Empty:
                if not producer.is_alive() and producer.batches.empty():
                    raise RuntimeError("the stream's producer thread ended without a result") from None
        self._waited += time.perf_counter() - start
        return message

    def _submit(self, batch: _Batch) -> _Running:
        done = None
        if batch.ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(batch.ready)
            batch.images.record_stream(compute)  # made on the side stream, used on this one
        output = self.srt.run(batch.images)
        if batch.ready is not None:
            done = torch.cuda.Event()
            done.record(compute)
        return _Running(batch, output.features, done)

    def _finish(self, running: _Running, producer: _Producer) -> Iterator[StreamItem]:
        if running.done is not None:
            running.done.synchronize()
        ready = time.perf_counter()
        batch, features = running.batch, running.features
        latencies = [ready - taken for taken in batch.taken]
        self._latencies.extend(latencies)
        self._end = ready
        for i, (index, frame_time, latency) in enumerate(zip(batch.indices, batch.times, latencies)):
            own = [layer[i] for layer in features] if isinstance(features, list) else features[i]
            yield StreamItem(index, frame_time, own, latency)
        producer.permits.release()  # all its frames yielded: the producer may take another batch


@dataclass
class _Batch:
    images: torch.Tensor  # (B, 3, H, W), normalised, on the SRT's device
    indices: list[int]
    times: list[float | None]
    taken: list[float]  # time.perf_counter() when each frame left the source
    ready: torch.cuda.Event | None  # recorded on the side stream after the copies and conversion


@dataclass
class _Running:
    batch: _Batch
    features: torch.Tensor | list[torch.Tensor]
    done: torch.cuda.Event | None


_END = object()  # the source is exhausted


@dataclass
class _Frame:
    index: int
    time: float | None
    taken: float
    image: torch.Tensor  # (3, H, W), normalised, on the device


class _Conversion:
    """Frames of any accepted type -> the model's input on the device: floats in [0, 1], resized,
    normalised with the backbone's mean and std; every frame the size of the first."""

    def __init__(self, device: torch.device, patch_size: int, mean, std, short_side: int | None,
                 size: tuple[int, int] | None):
        self.device, self.patch_size, self.mean, self.std = device, patch_size, mean, std
        self.short_side, self.size = short_side, size
        self.first_size: tuple[int, int] | None = None

    def __call__(self, item, position: int, side: torch.cuda.Stream | None) -> tuple[int, float | None, torch.Tensor]:
        index, frame_time = position, None
        if isinstance(item, VideoFrame):
            index, frame_time, item = item.index, item.time, item.image
        pixels = self.pixels(item, index)
        if side is not None:  # the copy and the conversion on the side stream
            if pixels.device.type == "cuda":  # a frame the source made on the GPU (on the default stream):
                side.wait_stream(torch.cuda.current_stream(self.device))  # read after the work that made it,
                pixels.record_stream(side)  # and its memory not reused before the side stream has read it
            with torch.cuda.stream(side):
                pixels = pixels.pin_memory().to(self.device, non_blocking=True) if pixels.device.type == "cpu" \
                    else pixels.to(self.device)
                return index, frame_time, self.model_input(pixels, index)
        return index, frame_time, self.model_input(pixels.to(self.device), index)

    def pixels(self, item, index: int) -> torch.Tensor:
        """The frame as a (3, H, W) tensor (a view where possible), uint8 or float in [0, 1]."""
        if isinstance(item, Image.Image):
            return to_rgb_tensor(item)
        if isinstance(item, np.ndarray):
            if item.ndim != 3 or item.shape[-1] != 3:
                raise ValueError(f"frame {index}: a numpy frame must be (H, W, 3), got shape {item.shape}")
            if not item.flags.writeable:  # torch wants writable memory
                item = item.copy()
            item = torch.from_numpy(item).permute(2, 0, 1)
        elif isinstance(item, torch.Tensor):
            if item.dim() != 3 or 3 not in (item.shape[0], item.shape[-1]):
                raise ValueError(f"frame {index}: a tensor frame must be (3, H, W) or (H, W, 3), "
                                 f"got shape {tuple(item.shape)}")
            item = item.detach() if item.shape[0] == 3 else item.detach().permute(2, 0, 1)
        else:
            raise TypeError(f"frame {index}: cannot read a {type(item).__name__} as a frame; frames are {FRAME_TYPES}")
        if item.dtype != torch.uint8 and not item.is_floating_point():
            raise TypeError(f"frame {index}: frames are uint8 or float in [0, 1], got {item.dtype}")
        if item.is_floating_point() and item.device.type == "cpu":  # (a GPU frame is not checked: no sync here)
            low, high = torch.aminmax(item)
            if not 0 <= low.item() <= high.item() <= 1:  # also refuses NaN
                raise ValueError(f"frame {index}: float frames hold values in [0, 1], got [{low.item():.4g}, "
                                 f"{high.item():.4g}]")
        return item

    def model_input(self, pixels: torch.Tensor, index: int) -> torch.Tensor:
        image = pixels.float().div_(255) if pixels.dtype == torch.uint8 else pixels.float()
        if self.short_side is not None:
            image = resize_to_patch_multiple(image, self.short_side, self.patch_size)
        elif self.size is not None and tuple(image.shape[-2:]) != self.size:
            image = F.interpolate(image[None], size=self.size, mode="bicubic", align_corners=False,
                                  antialias=True)[0].clamp(0, 1)
        size = tuple(image.shape[-2:])
        if self.first_size is None:
            self.first_size = size
        elif size != self.first_size:
            raise ValueError(f"frame {index} is {size[0]}x{size[1]} (HxW) as the model takes it, the stream's first "
                             f"frame {self.first_size[0]}x{self.first_size[1]}: all frames of a stream must end up "
                             f"one size (size=(H, W) resizes every frame to one)")
        return normalize(image, self.mean, self.std)


class _Producer(threading.Thread):
    """Takes frames from the source, converts them and puts _Batch objects, then _END or the
    source's exception, on ``batches``. Takes a permit for each batch; the consumer gives it back
    once the batch is yielded (back-pressure)."""

    def __init__(self, source: Iterator, convert: _Conversion, batch: int, prefetch: int,
                 side: torch.cuda.Stream | None):
        super().__init__(name="fastsrt-stream", daemon=True)  # daemon: a source stuck in next() never blocks exit
        self.source, self.convert, self.batch, self.side = source, convert, batch, side
        self.batches: queue.Queue = queue.Queue()
        self.permits = threading.Semaphore(prefetch + 1)  # + 1: the batch being computed or yielded
        self.stopping = threading.Event()
        self.position = 0

    def stop(self) -> None:
        self.stopping.set()
        self.join(JOIN_SECONDS)

    def run(self) -> None:
        try:
            with torch.no_grad():
                while self._acquire():
                    frames, error, exhausted = self._take()
                    if frames:
                        self.batches.put(self._batch(frames))
                    if error is not None:
                        self.batches.put(error)
                        return
                    if exhausted:
                        self.batches.put(_END)
                        return
        except BaseException as error:  # a failure while batching: the consumer raises it
            self.batches.put(error)
        finally:
            close = getattr(self.source, "close", None)
            if close is not None:
                try:
                    close()  # a generator's finally (a video's container, a camera) runs here, in its own thread
                except Exception as error:  # the iteration's outcome stays the one reported
                    self.batches.put(error)

    def _acquire(self) -> bool:
        while not self.stopping.is_set():
            if self.permits.acquire(timeout=POLL_SECONDS):
                return True
        return False

    def _take(self) -> tuple[list[_Frame], BaseException | None, bool]:
        """Up to ``batch`` converted frames; the exception that ended them, if any; whether the source ended."""
        frames = []
        try:
            while len(frames) < self.batch and not self.stopping.is_set():
                try:
                    item = next(self.source)
                except StopIteration:
                    return frames, None, True
                taken = time.perf_counter()
                index, frame_time, image = self.convert(item, self.position, self.side)
                self.position += 1
                frames.append(_Frame(index, frame_time, taken, image))
        except Exception as error:
            return frames, error, False
        return frames, None, False

    def _batch(self, frames: list[_Frame]) -> _Batch:
        ready = None
        if self.side is not None:
            with torch.cuda.stream(self.side):
                images = torch.stack([frame.image for frame in frames])
                ready = torch.cuda.Event()
                ready.record(self.side)
        else:
            images = torch.stack([frame.image for frame in frames])
        return _Batch(images, [f.index for f in frames], [f.time for f in frames], [f.taken for f in frames], ready)
