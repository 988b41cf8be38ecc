"""fastsrt.stream: the same results as SRT on the frames in memory, in order, from every frame type
and from video files; the source's errors after the frames before them; back-pressure; a loop
left early stops the thread; stats."""
import copy
import json
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from utils import rel_err, requires_cuda, tiny_vit

import fastsrt
from fastsrt.io import normalize, resize_to_patch_multiple
from fastsrt.streaming import Stream, StreamItem
from fastsrt.video import VideoReadError, read_video, write_video

SHORT_SIDE = 28
PATCH = 14


@pytest.fixture(scope="module")
def model():
    return tiny_vit()


def make_srt(model, **options) -> fastsrt.SRT:
    return fastsrt.SRT(model, shifts=1, **options)


def random_frames(count: int, height: int = 30, width: int = 40, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def in_memory(srt: fastsrt.SRT, images: list[torch.Tensor], short_side: int | None = SHORT_SIDE):
    """SRT on the frames ((3, H, W) floats in [0, 1]) resized and normalised here, all in one call."""
    if short_side is not None:
        images = [resize_to_patch_multiple(image, short_side, PATCH) for image in images]
    batch = torch.stack([normalize(image, srt.backbone.mean, srt.backbone.std) for image in images])
    return srt.run(batch).features


def as_float(frame: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frame).permute(2, 0, 1).float() / 255


def check_matches(items: list[StreamItem], expected, indices) -> None:
    assert [item.index for item in items] == list(indices)
    for position, item in enumerate(items):
        if isinstance(expected, list):  # several layers
            assert isinstance(item.features, list) and len(item.features) == len(expected)
            for got, want in zip(item.features, expected):
                assert got.shape == want[position].shape
                assert rel_err(got, want[position]) < 1e-5
        else:
            assert item.features.shape == expected[position].shape
            assert rel_err(item.features, expected[position]) < 1e-5


@pytest.mark.parametrize("output, layer", [("pixel", -1), ("token", -1), ("pixel", [0, 1])])
def test_results_equal_srt_in_memory_in_order(model, output, layer):
    srt = make_srt(model, output=output, layer=layer)
    frames = random_frames(7)  # batches of 3, 3 and a partial 1
    items = list(fastsrt.stream(frames, srt, batch=3, short_side=SHORT_SIDE))
    expected = in_memory(srt, [as_float(frame) for frame in frames])
    check_matches(items, expected, range(7))
    assert all(item.time is None and item.latency > 0 for item in items)
    pixel_shape = (48, 28, 42) if output == "pixel" else (48, 2, 3)
    first = items[0].features[0] if isinstance(layer, list) else items[0].features
    assert tuple(first.shape) == pixel_shape


def test_every_frame_type(model):
    srt = make_srt(model)
    frames = random_frames(8, height=28, width=42, seed=1)
    floats = [as_float(frame) for frame in frames]
    as_types = [
        frames[0],  # numpy (H, W, 3) uint8
        Image.fromarray(frames[1]),  # PIL RGB
        torch.from_numpy(frames[2]).permute(2, 0, 1).contiguous(),  # torch (3, H, W) uint8
        torch.from_numpy(frames[3]),  # torch (H, W, 3) uint8
        floats[4],  # torch (3, H, W) float in [0, 1]
        floats[5].permute(1, 2, 0).double(),  # torch (H, W, 3) float64
        np.asarray(Image.fromarray(frames[6])),  # a read-only numpy array
        frames[7].astype(np.float32) / 255,  # numpy float
    ]
    items = list(fastsrt.stream(as_types, srt, batch=3))  # frames already a patch multiple: no resize
    check_matches(items, in_memory(srt, floats, short_side=None), range(8))


def test_pil_modes_as_the_image_reader_reads_them(model):
    srt = make_srt(model)
    grey = Image.fromarray(random_frames(1, 28, 28, seed=2)[0][..., 0], mode="L")
    items = list(fastsrt.stream([grey, grey.convert("RGB")], srt, batch=2))
    assert rel_err(items[0].features, items[1].features) < 1e-6


@pytest.mark.parametrize("suffix, codec", [(".mp4", "libx264"), (".webm", "libvpx-vp9")])
def test_video_path(model, tmp_path, suffix, codec):
    path = tmp_path / f"clip{suffix}"
    write_video(path, random_frames(7, height=28, width=42, seed=3), fps=10, codec=codec)
    srt = make_srt(model)
    for every in (1, 2):
        decoded = list(read_video(path, every=every))
        items = list(fastsrt.stream(path, srt, batch=2, every=every))
        check_matches(items, in_memory(srt, [frame.image for frame in decoded], short_side=None),
                      [frame.index for frame in decoded])
        assert [item.time for item in items] == [frame.time for frame in decoded]
    assert [item.index for item in items] == [0, 2, 4, 6]


def test_unreadable_video_raises_the_readers_error(model, tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"not a video" * 100)
    with pytest.raises(VideoReadError, match="broken.mp4"):
        list(fastsrt.stream(path, make_srt(model)))


class SourceFailure(Exception):
    pass


def failing_after(frames, count):
    yield from frames[:count]
    raise SourceFailure(f"the camera went away after {count} frames")


@pytest.mark.parametrize("count", [0, 3, 5])
def test_source_error_after_the_frames_before_it(model, count):
    srt = make_srt(model)
    frames = random_frames(6)
    items = []
    with pytest.raises(SourceFailure, match=f"after {count} frames"):
        for item in fastsrt.stream(failing_after(frames, count), srt, batch=3, short_side=SHORT_SIDE):
            items.append(item)
    assert len(items) == count
    if count:
        check_matches(items, in_memory(srt, [as_float(frame) for frame in frames[:count]]), range(count))


def test_bad_frame_ends_the_stream_after_the_frames_before_it(model):
    srt = make_srt(model)
    frames = random_frames(4)
    cases = [
        ("not a frame", TypeError, "frame 2: cannot read a str"),
        (np.zeros((30, 40), np.uint8), ValueError, r"frame 2: a numpy frame must be \(H, W, 3\)"),
        (torch.zeros(3, 30, 40, dtype=torch.int32), TypeError, "frame 2: .*torch.int32"),
        (torch.full((3, 30, 40), 2.0), ValueError, r"frame 2: .*\[2, 2\]"),
        (torch.full((3, 30, 40), float("nan")), ValueError, "frame 2: .*nan"),
        (random_frames(1, height=30, width=80)[0], ValueError, "frame 2 is 28x70 .* first frame 28x42"),
    ]
    for bad, error, message in cases:
        items = []
        with pytest.raises(error, match=message):
            for item in fastsrt.stream([*frames[:2], bad, frames[3]], srt, batch=3, short_side=SHORT_SIDE):
                items.append(item)
        assert [item.index for item in items] == [0, 1]


def test_size_resizes_every_frame_to_one_size(model):
    srt = make_srt(model)
    frames = [*random_frames(2, 30, 40), *random_frames(2, 60, 50, seed=4)]
    items = list(fastsrt.stream(frames, srt, batch=3, size=(28, 42)))
    assert all(tuple(item.features.shape) == (48, 28, 42) for item in items)
    resized = [torch.nn.functional.interpolate(as_float(f)[None], size=(28, 42), mode="bicubic", antialias=True)[0]
               .clamp(0, 1) for f in frames]
    check_matches(items, in_memory(srt, resized, short_side=None), range(4))


class CountingSource:
    """An endless source that records how many frames were taken from it, and whether it was closed."""

    def __init__(self, frame):
        self.frame, self.taken, self.closed = frame, 0, False

    def __iter__(self):
        try:
            while True:
                self.taken += 1
                yield self.frame
        finally:
            self.closed = True


@pytest.mark.parametrize("batch, prefetch", [(1, 1), (3, 2)])
def test_back_pressure(model, batch, prefetch):
    source = CountingSource(random_frames(1)[0])
    ahead = []
    for yielded, _ in enumerate(fastsrt.stream(iter(source), make_srt(model), batch=batch, prefetch=prefetch,
                                               short_side=SHORT_SIDE), start=1):
        time.sleep(0.05)  # a slow consumer: the producer fills what it is allowed to
        ahead.append(source.taken - yielded)
        if yielded == 4 * batch * (prefetch + 1):
            break
    # at most prefetch + 1 batches taken and not yet yielded; the producer did run ahead
    assert max(ahead) <= (prefetch + 1) * batch - 1
    assert max(ahead) > batch - 1


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_leaving_the_loop_stops_the_thread_and_closes_the_source(model):
    srt = make_srt(model)
    before = threading.active_count()
    source = CountingSource(random_frames(1)[0])
    generator = iter(source)
    for index, _item in enumerate(fastsrt.stream(generator, srt, batch=2, short_side=SHORT_SIDE)):
        assert threading.active_count() == before + 1
        if index == 2:
            break
    assert wait_for(lambda: threading.active_count() == before), "the producer thread is still running"
    assert source.closed
    taken = source.taken
    time.sleep(0.2)
    assert source.taken == taken  # nothing is taken after the stop

    # an exception in the loop body, and close() on a stream whose generator is held, likewise
    with pytest.raises(KeyError):
        for _item in fastsrt.stream(iter(CountingSource(random_frames(1)[0])), srt, short_side=SHORT_SIDE):
            raise KeyError("the consumer failed")
    assert wait_for(lambda: threading.active_count() == before), "the producer thread outlived an exception"
    source = CountingSource(random_frames(1)[0])
    with fastsrt.stream(iter(source), srt, short_side=SHORT_SIDE) as stream:
        held = iter(stream)
        next(held)
    assert wait_for(lambda: threading.active_count() == before), "the producer thread outlived close()"
    assert source.closed


def test_stats(model):
    srt = make_srt(model)
    stream = fastsrt.stream(random_frames(5), srt, batch=2, short_side=SHORT_SIDE)
    empty = stream.stats()
    assert empty.frames == 0 and np.isnan(empty.latency_p50)
    items = list(stream)
    stats = stream.stats()
    latencies = [item.latency for item in items]
    assert stats.frames == 5
    assert 0 < max(latencies) <= stats.seconds
    assert stats.frames_per_second == pytest.approx(5 / stats.seconds)
    assert [stats.latency_p50, stats.latency_p95, stats.latency_p99] == \
        pytest.approx(np.percentile(latencies, (50, 95, 99)).tolist())
    assert min(latencies) <= stats.latency_p50 <= stats.latency_p95 <= stats.latency_p99 <= max(latencies)
    assert 0 <= stats.waited <= stats.seconds
    assert "5 frames" in str(stats)


def test_waited_shows_a_slow_source(model):
    def slow():
        for frame in random_frames(3):
            time.sleep(0.2)
            yield frame

    stream = fastsrt.stream(slow(), make_srt(model), short_side=SHORT_SIDE)
    for _ in stream:
        pass
    assert stream.stats().waited >= 0.2  # the first frame alone takes that long to arrive


def test_bad_arguments(model):
    srt = make_srt(model)
    frames = random_frames(1)
    with pytest.raises(ValueError, match="batch must be an int >= 1, got 0"):
        fastsrt.stream(frames, srt, batch=0)
    with pytest.raises(ValueError, match="prefetch must be an int >= 1, got 1.5"):
        fastsrt.stream(frames, srt, prefetch=1.5)
    with pytest.raises(ValueError, match="short_side or size, not both"):
        fastsrt.stream(frames, srt, short_side=28, size=(28, 28))
    with pytest.raises(ValueError, match=r"size must be \(height, width\), got 28"):
        fastsrt.stream(frames, srt, size=28)
    with pytest.raises(ValueError, match="every and fps subsample a video file"):
        fastsrt.stream(frames, srt, every=2)
    with pytest.raises(ValueError, match="every must be an int >= 1, got 0"):
        fastsrt.stream("clip.mp4", srt, every=0)
    with pytest.raises(TypeError, match="frames must be an iterable .* got int"):
        fastsrt.stream(3, srt)
    with pytest.raises(TypeError, match="srt must be a fastsrt.SRT, got VisionTransformer"):
        fastsrt.stream(frames, model)
    stream = fastsrt.stream(frames, srt, short_side=SHORT_SIDE)
    assert len(list(stream)) == 1
    with pytest.raises(RuntimeError, match="iterated once"):
        iter(stream)


def test_fastsrt_stream_is_the_function_after_its_module_is_imported(model):
    """The module has another name (fastsrt.streaming), so importing it cannot rebind fastsrt.stream."""
    import fastsrt.streaming

    assert fastsrt.stream is fastsrt.streaming.stream
    assert isinstance(fastsrt.stream([], make_srt(model)), Stream)


@requires_cuda
def test_cuda_pinned_side_stream_parity(model, tmp_path):
    """On a GPU: the frames are copied from pinned memory on a stream other than the compute stream,
    and the results match the CPU's."""
    frames = random_frames(5, seed=5)
    cpu_items = list(fastsrt.stream(frames, make_srt(model), batch=2, short_side=SHORT_SIDE))
    srt = make_srt(copy.deepcopy(model).cuda())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as profile:
        items = list(fastsrt.stream(frames, srt, batch=2, short_side=SHORT_SIDE))
    assert all(item.features.device.type == "cuda" for item in items)
    for item, expected in zip(items, cpu_items):
        assert rel_err(item.features.cpu(), expected.features) < 1e-4
    trace = tmp_path / "trace.json"
    profile.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    frame_bytes = frames[0].nbytes  # the frames' copies (not the small ones of mean, std, shift tables)
    copies = [e for e in events if e.get("cat") == "gpu_memcpy" and e.get("args", {}).get("bytes") == frame_bytes]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    assert copies and all("Pinned" in e["name"] for e in copies), {e["name"] for e in copies}
    compute_stream = Counter(e["args"]["stream"] for e in kernels).most_common(1)[0][0]  # the model's kernels
    assert compute_stream not in {e["args"]["stream"] for e in copies}
