"""fastsrt.stream on a video file against SRT on the same frames already in memory: whether
decoding, conversion and host-to-device copies hide behind the model's work. Random weights, the
paper's view grids, a H.264 video the suite writes (a moving random texture). Per model, size,
views K, batch B and dtype, side by side:
    in-memory  the baseline: SRT on the video's frames decoded, resized, normalised, batched and
               moved to the device beforehand (outside the timing), one SRT call per batch
    stream     ``for item in fastsrt.stream(video, srt, batch=B, size=(S, S))``: the video decoded
               and each frame converted, resized and (on a GPU) copied in the stream's background
               thread while the model works; its results are checked against the in-memory ones
The stream row's extra_info holds of_in_memory (its frames/s over the in-memory row's: the target
is >= 0.9), the stream's own latency percentiles (ms; the frame taken from the decoder to its
result ready) and how long the loop waited for the decoding thread, from the last timed round.
The same SRT object serves both rows of a group. On a CPU the model runs on one torch thread
(torch_threads in extra_info), leaving the other cores to the decoding thread as a deployment
would: an OpenMP team sharing a loaded CPU with other processes spin-waits at every barrier and
slows down many-fold at random, which would drown the comparison.
"""
from dataclasses import dataclass
from functools import lru_cache
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastsrt
from bench import harness
from bench.harness import DEVICE
from fastsrt.io import normalize
from fastsrt.video import read_video, write_video

# the video's frame count and side lengths (width, height): the decoder's work is its own, the model
# sees every frame resized to size x size
CPU_SHAPES = dict(models=("vit_small_patch14_dinov2",), sizes=(28, 56), views=(10,), batches=(4,),
                  dtypes=("float32",), frames=16, video=lambda size: (2 * size, 2 * size))
TARGET_SHAPES = dict(models=("vit_small_patch14_dinov2",), sizes=(518,), views=(50,), batches=(1, 8),
                     dtypes=("bfloat16",), frames=64, video=lambda size: (1280, 720))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
VIEW_GRIDS = {10: 1, 50: 3}  # views -> the paper's shift radius d
TOLERANCES = {"float32": 1e-5, "bfloat16": 1e-2}  # relative, stream vs in-memory
IMPLS = ("in-memory", "stream")
FPS = 30
CODEC = "libx264"


@dataclass(frozen=True)
class Case:
    model: str
    size: int
    views: int
    batch: int
    dtype: str
    frames: int
    video: tuple[int, int]
    impl: str

    @property
    def id(self) -> str:
        short = self.model.removesuffix("_patch14_dinov2")
        return f"{short}-{self.size}px-K{self.views}-B{self.batch}-{self.dtype}-{self.impl}"

    @property
    def group(self) -> str:
        return f"stream {self.model} {self.size}x{self.size} K={self.views} B={self.batch} {self.dtype}"


def pytest_generate_tests(metafunc):
    shapes = TARGET_SHAPES if metafunc.config.getoption("target_shapes") else CPU_SHAPES
    cases = [Case(model, size, views, batch, dtype, shapes["frames"], shapes["video"](size), impl)
             for model, size, views, batch, dtype, impl in product(shapes["models"], shapes["sizes"], shapes["views"],
                                                                   shapes["batches"], shapes["dtypes"], IMPLS)]
    metafunc.parametrize("case", harness.params(cases, gpu_only=lambda case: False))


@pytest.fixture(scope="module", autouse=True)
def cpu_threads():
    """One torch thread on a CPU for this suite (module doc), the setting restored after it."""
    threads = torch.get_num_threads()
    if DEVICE.type == "cpu":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    # each row skips, rather than the module, so that rows asked for by id are reported skipped (exit 0)
    pytest.importorskip("av", reason="the stream benchmark decodes a video with PyAV: pip install av (fastsrt[video])")
    return tmp_path_factory.mktemp("stream-videos")


def moving_texture(frames: int, width: int, height: int):
    """(H, W, 3) uint8 frames: a smooth random texture sliding right, 4 pixels a frame, with noise."""
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.random((1, 3, max(height // 8, 1), max(width // 8, 1)), dtype=np.float32))
    texture = (F.interpolate(coarse, size=(height, width), mode="bilinear")[0].permute(1, 2, 0).numpy() * 255)
    for index in range(frames):
        noise = rng.normal(0, 8, texture.shape)
        yield np.clip(np.roll(texture, 4 * index, axis=1) + noise, 0, 255).astype(np.uint8)


def video(directory: Path, case: Case) -> Path:
    width, height = case.video
    path = directory / f"texture-{width}x{height}-{case.frames}.mp4"
    if not path.exists():
        write_video(path, moving_texture(case.frames, width, height), fps=FPS, codec=CODEC)
    return path


@lru_cache(maxsize=1)
def load_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return fastsrt.load_timm_model(name, pretrained=False).eval().to(DEVICE)


@lru_cache(maxsize=1)
def make_srt(model: str, views: int, dtype: str) -> fastsrt.SRT:
    return fastsrt.SRT(load_model(model), fastsrt.paper_grid(VIEW_GRIDS[views]), dtype=DTYPES[dtype])


def in_memory_batches(path: Path, srt: fastsrt.SRT, case: Case) -> list[torch.Tensor]:
    """The video's frames decoded, resized to size x size as the stream does, normalised, batched, on the device."""
    images = [F.interpolate(frame.image[None], size=(case.size, case.size), mode="bicubic", align_corners=False,
                            antialias=True)[0].clamp(0, 1) for frame in read_video(path)]
    images = torch.stack([normalize(image, srt.backbone.mean, srt.backbone.std) for image in images])
    return [chunk.to(DEVICE) for chunk in images.split(case.batch)]


def checked_frames(case: Case) -> set[int]:
    """The frames whose results are compared (all of them would not fit the GPU at the target shapes)."""
    return {0, 1, case.frames - 1}


_in_memory: dict[str, tuple[dict, float | None]] = {}  # group -> (its checked results, median seconds)


def test_stream(benchmark, case, video_dir):
    benchmark.group = case.group
    path = video(video_dir, case)
    srt = make_srt(case.model, case.views, case.dtype)
    checked = checked_frames(case)
    info = dict(impl=case.impl, baseline=case.impl == "in-memory", dtype=case.dtype, images=case.frames,
                torch_threads=torch.get_num_threads(),
                video=f"{case.video[0]}x{case.video[1]} {CODEC}, {case.frames} frames",
                shape=dict(model=case.model, size=case.size, views=case.views, batch=case.batch, frames=case.frames))

    if case.impl == "in-memory":
        batches = in_memory_batches(path, srt, case)

        def run_in_memory():
            kept, start = {}, 0
            for batch in batches:
                features = srt.run(batch).features
                kept.update({i: features[i - start] for i in checked if start <= i < start + len(batch)})
                start += len(batch)
            return kept

        kept = harness.measure(benchmark, lambda: run_in_memory, ran="in-memory", **info)
        _in_memory[case.group] = (kept, None if benchmark.disabled else benchmark.stats.stats.median)
        return

    last_stats = []

    def run_stream():
        stream = fastsrt.stream(path, srt, batch=case.batch, size=(case.size, case.size))
        kept = {item.index: item.features for item in stream if item.index in checked}
        last_stats[:] = [stream.stats()]
        return kept

    kept = harness.measure(benchmark, lambda: run_stream, ran="stream", **info)
    stats = last_stats[0]
    assert stats.frames == case.frames
    benchmark.extra_info.update(latency_ms={name: round(1e3 * getattr(stats, f"latency_{name}"), 2)
                                            for name in ("p50", "p95", "p99")},
                                waited_s=round(stats.waited, 4), stream_seconds=round(stats.seconds, 4))
    if case.group not in _in_memory:
        pytest.skip("the in-memory row of this group did not run before it")
    expected, in_memory_median = _in_memory[case.group]
    if in_memory_median is not None:
        benchmark.extra_info["of_in_memory"] = round(in_memory_median / benchmark.stats.stats.median, 3)
    output, expected = (torch.stack([results[i] for i in sorted(checked)]).double() for results in (kept, expected))
    error = ((output - expected).norm() / expected.norm()).item()
    benchmark.extra_info["rel_err_vs_in_memory"] = float(f"{error:.2e}")
    assert output.shape == expected.shape and error <= TOLERANCES[case.dtype], error
