"""fastsrt.video: frames come back as written (up to the codec's loss), subsampled as asked, upright,
and a damaged file is reported with the frames read before the damage."""
from fractions import Fraction

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from fastsrt import video  # noqa: E402
from fastsrt.io import ImageReadError  # noqa: E402

FPS = 10


def moving_bars(count: int, height: int = 48, width: int = 64) -> list[np.ndarray]:
    """Frames with a bright bar that moves 4 px a frame and a green level that counts frames."""
    rng = np.random.default_rng(0)
    frames = []
    for i in range(count):
        frame = rng.integers(0, 40, (height, width, 3), dtype=np.uint8)
        frame[:, (4 * i) % (width - 8):(4 * i) % (width - 8) + 8, 0] = 250
        frame[..., 1] = 6 * i
        frames.append(frame)
    return frames


@pytest.fixture(scope="module", params=[("libx264", "clip.mp4"), ("libvpx-vp9", "clip.webm"), ("mpeg4", "clip.mkv")])
def clip(request, tmp_path_factory):
    codec, name = request.param
    path = tmp_path_factory.mktemp(codec) / name
    frames = moving_bars(30)
    assert video.write_video(path, frames, FPS, codec=codec, quality=10) == 30
    return path, frames


def test_frames_come_back_in_order_with_their_times(clip):
    path, frames = clip
    info = video.probe(path)
    assert (info.width, info.height, info.fps, info.frames) == (64, 48, FPS, 30)
    decoded = list(video.read_video(path))
    assert [f.index for f in decoded] == list(range(30))
    np.testing.assert_allclose([f.time for f in decoded], np.arange(30) / FPS, atol=1e-3)
    for frame, written in zip(decoded, frames):
        assert frame.image.shape == (3, 48, 64) and frame.image.dtype == torch.float32
        expected = torch.from_numpy(written).permute(2, 0, 1).float() / 255
        assert (frame.image - expected).abs().mean() < 0.05  # lossy codecs, 4:2:0 chroma
    # each frame is closest to the frame written at its index: nothing dropped, duplicated or reordered
    for frame in decoded[::7]:
        errors = [(frame.image - torch.from_numpy(w).permute(2, 0, 1).float() / 255).abs().mean() for w in frames]
        assert int(np.argmin(errors)) == frame.index


def test_every_and_fps_pick_the_frames_they_name(clip):
    path, _ = clip
    assert [f.index for f in video.read_video(path, every=4)] == list(range(0, 30, 4))
    # 3 frames per second of a 10 fps video: the first frame at or after 0, 1/3, 2/3, 1 ... s
    assert [f.index for f in video.read_video(path, fps=3)] == [int(np.ceil(k * FPS / 3 - 1e-6)) for k in range(9)]
    assert len(list(video.read_video(path, fps=100))) == 30


@pytest.mark.parametrize("bad", [{"every": 0}, {"every": 1.5}, {"fps": 0}, {"fps": -2}])
def test_bad_subsampling_is_refused(clip, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        list(video.read_video(clip[0], **bad))


def test_a_rotated_phone_video_comes_out_upright(tmp_path):
    frames = moving_bars(3, 32, 48)
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.options = {"crf": "10"}
        for pixels in frames:
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    plain = list(video.read_video(path))
    rotated_path = tmp_path / "rotated.mp4"
    # as a phone records a turned camera: the same pixels, plus a display rotation (90 degrees counter-clockwise,
    # FFmpeg's convention) that players apply
    with av.open(str(path)) as source, av.open(str(rotated_path), "w") as out:
        stream_in = source.streams.video[0]
        stream_out = out.add_stream_from_template(stream_in)
        stream_out.set_display_rotation(90)
        for packet in source.demux(stream_in):
            if packet.dts is not None:
                packet.stream = stream_out
                out.mux(packet)
    turned = list(video.read_video(rotated_path))
    assert turned[0].image.shape == (3, 48, 32)
    for a, b in zip(plain, turned):
        assert torch.equal(torch.rot90(a.image, k=1, dims=(1, 2)), b.image)


def test_a_truncated_video_reports_the_frames_read_and_why(clip, tmp_path):
    path, _ = clip
    cut = tmp_path / f"cut{path.suffix}"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    read = []
    with pytest.raises(video.VideoReadError) as caught:
        for frame in video.read_video(cut):
            read.append(frame.index)
    error = caught.value
    assert isinstance(error, ImageReadError) and error.path == cut
    assert error.frames_read == len(read) < 30
    assert str(cut) in str(error) and f"{len(read)} frame(s) read" in str(error)
    if path.suffix == ".mp4":  # its index (moov) is written last: half a file cannot be opened at all
        assert read == [] and "not a readable video" in str(error)
    else:
        assert read and "truncated" in str(error)


@pytest.mark.parametrize("content, reason", [(b"", "not a readable video"), (b"\x00\x01 not a video" * 50,
                                                                            "not a readable video")])
def test_files_that_are_not_videos_are_named(tmp_path, content, reason):
    path = tmp_path / "broken.mp4"
    path.write_bytes(content)
    with pytest.raises(video.VideoReadError, match=reason):
        list(video.read_video(path))
    with pytest.raises(video.VideoReadError, match="no such file"):
        list(video.read_video(tmp_path / "missing.mp4"))


def test_writing_needs_frames_and_a_known_container(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        video.write_video(tmp_path / "empty.mp4", [], FPS)
    with pytest.raises(ValueError, match="container format"):
        video.write_video(tmp_path / "clip.xyz", moving_bars(1), FPS)
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_fps_after_a_gap_in_the_timestamps_keeps_no_burst(tmp_path):
    """A variable-frame-rate video (as phones record): frames at 0..0.3 s, then from 2.0 s. At 5 fps
    the kept frames are the first at or after each 0.2 s step from the last kept one, so after the gap
    the frames do not come back to back to catch up."""
    path = tmp_path / "vfr.mp4"
    times = [0, 1, 2, 3, 20, 21, 22, 23]  # tenths of a second
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, FPS)
        for tenth, pixels in zip(times, moving_bars(len(times))):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = tenth, Fraction(1, FPS)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    decoded = [round(frame.time, 3) for frame in video.read_video(path)]
    assert decoded == [t / 10 for t in times]  # the container kept the gap
    assert [round(frame.time, 3) for frame in video.read_video(path, fps=5)] == [0.0, 0.2, 2.0, 2.2]
