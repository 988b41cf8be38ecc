"""Videos: fastsrt.video's reader and writer, and `fastsrt extract` on video files (the features of
every kept frame, the preview, frame selection, resume, damaged files, the size limit, rotation).
The videos are written here, a few frames of moving content in two codecs."""
import math

import numpy as np
import pytest
import torch

from fastsrt.backbone import Backbone
from fastsrt.cli import main
from fastsrt.io import load_metadata, load_tensors, normalize, resize_to_patch_multiple
from fastsrt.srt import SRT
from fastsrt.video import VideoReadError, VideoWriter, probe, read_video, write_video
from fastsrt.video_extract import PREVIEW_FIT_FRAMES, _Preview

pytest.importorskip("av")

# test_vit: 6 blocks, 64 channels, patch 16; 32 px frames give 2 x 3 token grids
FAST = ["--model", "test_vit", "--pretrained", "no", "--shifts", "1", "--size", "32"]


def moving_frames(count: int, height: int = 40, width: int = 56, seed: int = 0) -> list[np.ndarray]:
    """A textured background with a bright bar and a square that move from frame to frame."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 120, (height, width, 3), dtype=np.uint8)
    frames = []
    for i in range(count):
        frame = background.copy()
        frame[:, (5 * i) % width: (5 * i) % width + 8] = (240, 200, 40)
        top = (3 * i) % (height - 10)
        frame[top: top + 10, 10:20] = (30, 90, 250)
        frames.append(frame)
    return frames


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """clip.mp4 (H.264, 7 frames at 10 fps) and other.webm (VP9, 5 frames at 10 fps)."""
    folder = tmp_path_factory.mktemp("videos")
    write_video(folder / "clip.mp4", moving_frames(7), fps=10, codec="libx264")
    write_video(folder / "other.webm", moving_frames(5, seed=1), fps=10, codec="libvpx-vp9")
    return folder


@pytest.fixture(scope="module")
def reference_srt():
    """The SRT the FAST options build (seeded random weights), giving token output."""
    return SRT(Backbone("test_vit", pretrained=False, seed=0).eval(), 1, output="token")


def srt_in_memory(srt: SRT, path):
    """Raw and SRT features of the decoded frames, one frame at a time, in float32."""
    raws, features = [], []
    for frame in read_video(path):
        image = resize_to_patch_multiple(frame.image, 32, srt.patch_size)
        batch = normalize(image, srt.backbone.mean, srt.backbone.std)[None]
        raws.append(srt.backbone(batch, -1).tokens[0][0])
        features.append(srt.run(batch).features[0])
    return torch.stack(raws), torch.stack(features)


@pytest.fixture(scope="module")
def in_memory(videos, reference_srt):
    """name -> raw and SRT features of every frame of the two videos, computed in memory."""
    return {name: srt_in_memory(reference_srt, videos / name) for name in ("clip.mp4", "other.webm")}


def test_extract_videos_and_an_image_from_one_folder(videos, tmp_path, in_memory, capsys):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in ("clip.mp4", "other.webm"):
        (folder / name).symlink_to(videos / name)
    from PIL import Image
    Image.fromarray(moving_frames(1)[0]).save(folder / "still.png")
    out = tmp_path / "out"
    assert main(["extract", str(folder), "--out", str(out), *FAST]) == 0
    assert "3 written" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["clip.preview.mp4", "clip.safetensors", "other.preview.mp4",
                                                     "other.safetensors", "still.png", "still.safetensors"]
    for name, count in (("clip", 7), ("other", 5)):
        tensors = load_tensors(out / f"{name}.safetensors")  # checks the digest too
        assert tensors["raw"].shape == tensors["srt"].shape == (count, 64, 2, 3)
        assert tensors["raw"].dtype == tensors["srt"].dtype == torch.float16
        assert tensors["times"].dtype == torch.float64 and tensors["indices"].tolist() == list(range(count))
        source = videos / ("clip.mp4" if name == "clip" else "other.webm")
        assert tensors["times"].tolist() == pytest.approx([frame.time for frame in read_video(source)])
        assert tensors["times"].tolist() == pytest.approx([i / 10 for i in range(count)])
        raw, srt = in_memory[source.name]
        for stored, expected in ((tensors["raw"], raw), (tensors["srt"], srt)):  # float16 rounding: 2^-11 relative
            assert (stored.float() - expected).abs().max() <= 2e-3 * expected.abs().max()
        assert not torch.allclose(srt[0], srt[-1], atol=1e-3)  # the frames differ
        assert not torch.allclose(srt, raw, atol=1e-3)
        meta = load_metadata(out / f"{name}.safetensors")
        assert meta["complete"] is True and meta["frames"] == count and meta["kind"] == "video"
        assert meta["model"].startswith("test_vit") and meta["shifts"][0] == [0, 0] and len(meta["shifts"]) == 10
        assert meta["image_size"] == [32, 48] and meta["store_dtype"] == "float16" and meta["dtype"] == "float32"
        assert meta["every"] == 1 and meta["fps"] is None and meta["output"] == "token"
        assert meta["video"]["frames"] == count and meta["video"]["width"] == 56 and meta["video"]["fps"] == 10
        preview = probe(out / f"{name}.preview.mp4")
        assert preview.frames == count and preview.fps == 10
        assert preview.width % 2 == 0 and preview.height % 2 == 0 and preview.width > 3 * 48 and preview.height > 32
        assert len(list(read_video(out / f"{name}.preview.mp4"))) == count
    assert load_tensors(out / "still.safetensors")["srt"].shape == (64, 32, 48)  # images keep --output pixel

    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["extract", str(folder), "--out", str(out), *FAST]) == 0  # resumed: nothing redone
    assert "0 written, 3 already done" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written


@pytest.mark.parametrize("option,indices", [(["--every", "3"], [0, 3, 6]), (["--fps", "5"], [0, 2, 4, 6]),
                                            (["--fps", "3"], [0, 4])])
def test_frame_selection(videos, tmp_path, in_memory, option, indices):
    out = tmp_path / "out"
    assert main(["extract", str(videos / "clip.mp4"), "--out", str(out), "--no-preview", *option, *FAST]) == 0
    tensors = load_tensors(out / "clip.safetensors")
    assert tensors["indices"].tolist() == indices
    assert tensors["times"].tolist() == pytest.approx([i / 10 for i in indices])
    if option[0] == "--fps":  # the first frame at or after each multiple of 1/fps
        step = 1 / float(option[1])
        times = [i / 10 for i in range(7)]
        assert indices == sorted({next(i for i, t in enumerate(times) if t >= k * step - 1e-9)
                                  for k in range(math.floor(times[-1] / step + 1e-9) + 1)})
    _, srt = in_memory["clip.mp4"]
    assert (tensors["srt"].float() - srt[indices]).abs().max() <= 2e-3 * srt.abs().max()
    assert not (out / "clip.preview.mp4").exists()
    assert load_metadata(out / "clip.safetensors")["every" if option[0] == "--every" else "fps"] == float(option[1])


def test_damaged_videos_are_reported_with_the_frames_read_and_the_others_written(videos, tmp_path, capsys):
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "clip.mp4").symlink_to(videos / "clip.mp4")
    whole = tmp_path / "whole.mkv"
    write_video(whole, moving_frames(10), fps=10, codec="libx264")
    data = whole.read_bytes()
    (folder / "cut.mkv").write_bytes(data[: len(data) // 2])  # Matroska: FFmpeg stops quietly at the cut
    mp4 = (videos / "clip.mp4").read_bytes()
    (folder / "halved.mp4").write_bytes(mp4[: len(mp4) // 2])  # MP4: its index (moov) is at the end, cut off
    out = tmp_path / "out"
    arguments = ["extract", str(folder), "--out", str(out), *FAST]
    assert main(arguments) == 1
    captured = capsys.readouterr()
    assert "1 written, 0 already done (skipped), 2 failed" in captured.out
    failures = [line for line in captured.err.splitlines() if line.startswith("  failed: ")]
    assert len(failures) == 2
    halved = next(line for line in failures if "halved.mp4" in line)
    assert "not a readable video" in halved and "(0 frame(s) read)" in halved
    cut = next(line for line in failures if "cut.mkv" in line)
    assert "ends short of its 10 frames" in cut and "cut.partial.safetensors" in cut
    partial = load_tensors(out / "cut.partial.safetensors")
    meta = load_metadata(out / "cut.partial.safetensors")
    read = meta["frames_read"]
    assert meta["complete"] is False and 0 < read < 10 and f"({read} frame(s) read)" in cut
    assert partial["indices"].tolist() == list(range(read)) and partial["srt"].shape == (read, 64, 2, 3)
    assert "truncated" in meta["reason"]
    assert sorted(p.name for p in out.iterdir()) == ["clip.preview.mp4", "clip.safetensors",
                                                     "cut.partial.safetensors"]  # no temporaries left

    assert main(arguments) == 1  # a rerun tries the damaged ones again
    assert "0 written, 1 already done (skipped), 2 failed" in capsys.readouterr().out
    (folder / "cut.mkv").write_bytes(data)  # the whole file again: written, the partial result removed
    assert main(arguments) == 1
    assert "1 written, 1 already done (skipped), 1 failed" in capsys.readouterr().out
    assert load_metadata(out / "cut.safetensors")["complete"] is True
    assert load_tensors(out / "cut.safetensors")["indices"].tolist() == list(range(10))
    assert not (out / "cut.partial.safetensors").exists()


def test_pixel_output_says_its_size_first_and_is_refused_past_max_bytes(videos, tmp_path, capsys):
    out = tmp_path / "out"
    arguments = ["extract", str(videos / "clip.mp4"), "--out", str(out), "--video-output", "pixel", *FAST]
    # per frame: 64 channels x (2 x 3 tokens + 32 x 48 pixels) x 2 bytes = 197,376 bytes; 7 frames: 1,381,632
    assert main([*arguments, "--max-bytes", "1000000"]) == 1
    captured = capsys.readouterr()
    assert "clip.mp4: pixel-resolution SRT features, 64 x 32 x 48 float16 a frame with the raw ones, 7 frames: " \
           "1.4 MB" in captured.out
    failure = [line for line in captured.err.splitlines() if line.startswith("  failed: ")]
    assert len(failure) == 1 and "would take 1.4 MB (7 frames x 197376 bytes), over --max-bytes 1000000" in failure[0]
    assert not out.exists() or not any(out.iterdir())

    assert main([*arguments, "--max-bytes", "1400000", "--store-dtype", "float32", "--no-preview"]) == 1
    assert "would take 2.8 MB" in capsys.readouterr().err  # float32 doubles it
    assert main([*arguments, "--max-bytes", "1400000", "--no-preview"]) == 0
    tensors = load_tensors(out / "clip.safetensors")
    assert tensors["srt"].shape == (7, 64, 32, 48) and tensors["raw"].shape == (7, 64, 2, 3)
    assert load_metadata(out / "clip.safetensors")["output"] == "pixel"


def test_a_rotated_video_comes_out_upright(tmp_path, reference_srt):
    import av

    frames = moving_frames(3)
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as container:  # stored 56 x 40, shown turned 90 degrees counter-clockwise
        stream = container.add_stream("libx264", rate=10)
        stream.pix_fmt, stream.width, stream.height = "yuv420p", 56, 40
        stream.set_display_rotation(90)
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    decoded = list(read_video(path))
    assert decoded[0].image.shape == (3, 56, 40)
    upright = torch.from_numpy(np.rot90(frames[0]).copy()).permute(2, 0, 1).float() / 255
    blocks = lambda image: torch.nn.functional.avg_pool2d(image[None], 8)[0]  # the codec's noise averages out
    assert (blocks(decoded[0].image) - blocks(upright)).abs().mean() < 0.015  # measured: 0.005
    for wrong in (upright.flip(1, 2), upright.flip(1), upright.flip(2)):  # turned the other way, or mirrored
        assert (blocks(decoded[0].image) - blocks(wrong)).abs().mean() > 0.03  # measured: 0.04 to 0.17

    out = tmp_path / "out"
    assert main(["extract", str(path), "--out", str(out), "--no-preview", *FAST]) == 0
    tensors = load_tensors(out / "phone.safetensors")
    assert tensors["srt"].shape == (3, 64, 3, 2)  # 48 x 32 pixels upright: 3 x 2 tokens
    assert load_metadata(out / "phone.safetensors")["image_size"] == [48, 32]
    _, srt = srt_in_memory(reference_srt, path)
    assert (tensors["srt"].float() - srt).abs().max() <= 2e-3 * srt.abs().max()


def test_preview_colours_come_from_one_basis_fitted_on_the_first_frames():
    class Frames(list):
        write = list.append

    generator = torch.Generator().manual_seed(0)
    written = Frames()
    preview = _Preview(written)
    fixed = torch.randn(16, generator=generator) * 0.5
    for i in range(PREVIEW_FIT_FRAMES + 4):
        raw = torch.randn(16, 2, 3, generator=generator) * (1 + i)  # the spread grows: a per-frame fit would drift
        raw[:, 0, 0] = fixed  # one token holds the same feature in every frame
        preview.add(torch.rand(3, 32, 48, generator=generator), raw, raw.flip(-1))
    preview.flush()
    assert len(written) == PREVIEW_FIT_FRAMES + 4 and all(f.shape == written[0].shape for f in written)
    assert all(f.shape[0] % 2 == 0 and f.shape[1] % 2 == 0 for f in written)
    # panels start below an 8 px gap and an 18 px caption, the raw one after the input's 48 px and two gaps;
    # its top-left token covers 16 x 16 pixels
    top, left = 8 + 18, 8 + 48 + 8
    token = [f[top + 4: top + 12, left + 4: left + 12] for f in written]
    assert all(np.array_equal(t, token[0]) for t in token)
    assert len({f[top + 4, left + 20].tobytes() for f in written}) > 1  # the other tokens change colour


def test_video_writer_leaves_nothing_on_an_error_and_reads_back(tmp_path):
    path = tmp_path / "v.webm"
    with pytest.raises(KeyError), VideoWriter(path, fps=5, codec="libvpx-vp9") as writer:
        writer.write(moving_frames(1)[0])
        raise KeyError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="frame 1 is 40 x 56"), VideoWriter(path, 5, "libvpx-vp9") as writer:
        writer.write(moving_frames(1)[0])
        writer.write(moving_frames(1, height=56, width=40)[0])
    assert list(tmp_path.iterdir()) == []
    assert write_video(path, moving_frames(4), fps=5, codec="libvpx-vp9") == 4
    assert [frame.index for frame in read_video(path)] == [0, 1, 2, 3]
    with pytest.raises(VideoReadError, match="no such file"):
        list(read_video(tmp_path / "missing.mp4"))


def test_max_views_is_recorded_per_frame_and_per_image(videos, tmp_path, reference_srt):
    """--max-views 3: the first 3 views of the anytime order, for every frame of a video and for an
    image; the files say how many views each frame had."""
    from PIL import Image

    Image.fromarray(moving_frames(1)[0]).save(tmp_path / "still.png")
    out = tmp_path / "out"
    inputs = [str(videos / "clip.mp4"), str(tmp_path / "still.png")]
    assert main(["extract", *inputs, "--out", str(out), "--no-preview", "--no-png", "--max-views", "3", *FAST]) == 0
    stored = load_tensors(out / "clip.safetensors")
    assert stored["views_done"].tolist() == [3] * 7
    assert load_metadata(out / "still.safetensors")["views_done"] == 3
    few = SRT(reference_srt.backbone, 1, output="token", max_views=3)
    frame = next(read_video(videos / "clip.mp4"))
    batch = normalize(resize_to_patch_multiple(frame.image, 32, few.patch_size), few.backbone.mean, few.backbone.std)
    expected = few.run(batch[None]).features[0]
    assert torch.allclose(stored["srt"][0].float(), expected, rtol=1e-2, atol=1e-2)  # stored as float16
    assert not torch.allclose(expected, reference_srt.run(batch[None]).features[0], rtol=1e-2, atol=1e-2)


def test_the_auto_frame_batch_fills_the_view_batch_with_the_views_that_run(reference_srt):
    from fastsrt.video_extract import frames_per_call

    every_view = SRT(reference_srt.backbone, 1, view_batch=40)  # 10 views
    assert frames_per_call(every_view, "auto") == 4 and frames_per_call(every_view, 3) == 3
    assert frames_per_call(SRT(reference_srt.backbone, 1, view_batch=40, max_views=5), "auto") == 8
    assert frames_per_call(SRT(reference_srt.backbone, 3, view_batch=8), "auto") == 1  # 50 views: at least one
