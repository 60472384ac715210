"""media.py and synth.py on real files written with PyAV / PIL (no mocks)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clips import frame_index, marker_corner, write_audio_only, write_clip, write_exif_jpeg
from hvtune.data import media
from hvtune.data.media import MediaError


def read(path: Path, num_frames: int = 5, size: tuple[int, int] = (64, 48), frame_rate: float | None = None, **kw):
    return media.read_video(
        path, num_frames=num_frames, size=size, frame_rate=frame_rate, **{"seed": 0, "key": "k", **kw}
    )


def indices(frames: torch.Tensor) -> list[int]:
    return [frame_index(f) for f in frames.numpy()]


def test_round_trip_size_and_frame_count(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "a.mp4", frames=33, size=(64, 48), fps=24)
    info = media.probe_video(path)
    assert (info.width, info.height, info.num_frames, info.fps) == (64, 48, 33, 24.0)
    assert info.duration_s == pytest.approx(33 / 24)
    assert (info.rotation, info.pix_fmt, info.bit_depth, info.variable_frame_rate, info.notices) == (
        0,
        "yuv420p",
        8,
        False,
        (),
    )
    frames = read(path, num_frames=33)
    assert frames.dtype == torch.uint8 and frames.shape == (33, 3, 48, 64)
    assert indices(frames) == list(range(33))
    assert marker_corner(frames[0].numpy()) == "tl"
    # downscale keeps the aspect ratio; a square target is a centre crop, never a stretch
    assert read(path, size=(32, 24)).shape == (5, 3, 24, 32)
    square = read(path, size=(48, 48))
    assert square.shape == (5, 3, 48, 48)
    assert torch.equal(square, read(path)[..., 8:56])


@pytest.mark.parametrize(("rotation", "corner"), [(90, "tr"), (180, "br"), (270, "bl")])
def test_rotation_metadata_is_applied(tmp_path: Path, rotation: int, corner: str) -> None:
    # PyAV 18 writes a display matrix (Stream.set_display_rotation), the same side data a phone writes.
    path = write_clip(tmp_path / f"r{rotation}.mp4", frames=9, rotation_cw=rotation)
    info = media.probe_video(path)
    display = (48, 64) if rotation in (90, 270) else (64, 48)
    assert info.rotation == rotation and (info.width, info.height) == display
    assert any("rotation" in n for n in info.notices)
    frames = read(path, size=display)
    assert frames.shape == (5, 3, display[1], display[0])
    assert marker_corner(frames[0].numpy()) == corner
    first = media.first_frame(path)
    assert first.size == display
    assert marker_corner(np.asarray(first).transpose(2, 0, 1)) == corner


def test_resample_48_to_24_keeps_every_other_frame(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "fast.mp4", frames=36, fps=48)
    info = media.probe_video(path)
    assert media.frames_available(info, 24) == 18 and media.frames_available(info, None) == 36
    assert indices(read(path, num_frames=18, frame_rate=24)) == list(range(0, 36, 2))
    start = media.choose_window(18, 5, 3, "w")
    assert indices(read(path, num_frames=5, frame_rate=24, seed=3, key="w")) == [2 * (start + k) for k in range(5)]


def test_window_choice_is_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    starts = {media.choose_window(100, 17, seed, "clip.mp4") for seed in range(20)}
    assert len(starts) > 5 and all(0 <= s <= 83 for s in starts)
    assert media.choose_window(100, 17, 7, "clip.mp4") == media.choose_window(100, 17, 7, "clip.mp4")
    assert len({media.choose_window(100, 17, 7, f"clip{i}.mp4") for i in range(20)}) > 5
    assert media.choose_window(17, 17, 7, "clip.mp4") == 0
    with pytest.raises(ValueError):
        media.choose_window(16, 17, 0, "clip.mp4")
    path = write_clip(tmp_path / "w.mp4", frames=33)
    random.seed(1)
    torch.manual_seed(1)
    a = read(path, num_frames=9, seed=5, key="w.mp4")
    random.seed(2)
    torch.manual_seed(2)  # global RNGs play no part
    assert torch.equal(a, read(path, num_frames=9, seed=5, key="w.mp4"))
    assert indices(a)[0] == media.choose_window(33, 9, 5, "w.mp4")
    assert len({indices(read(path, num_frames=9, seed=s, key="w.mp4"))[0] for s in range(6)}) > 1


def _faststart_truncated(path: Path) -> Path:
    data = write_clip(path.with_suffix(".full.mp4"), container_options={"movflags": "+faststart"}).read_bytes()
    path.write_bytes(data[: int(len(data) * 0.9)])
    return path


def _half(path: Path) -> Path:
    data = write_clip(path.with_suffix(".full.mp4")).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(
    ("make", "reason", "kwargs"),
    [
        (lambda p: p.write_bytes(b""), "zero_byte", {}),
        (_half, "corrupt", {}),  # moov atom at the end: container cannot be opened
        (_faststart_truncated, "corrupt", {}),  # header intact, frames missing
        (lambda p: p.write_bytes(random.Random(0).randbytes(4096)), "corrupt", {}),
        (lambda p: write_audio_only(p, codec="aac"), "audio_only", {}),
        (lambda p: write_audio_only(p.with_suffix(".mp2"), codec="mp2").rename(p), "audio_only", {}),
        (lambda p: write_clip(p, frames=9), "too_few_frames", {"num_frames": 13}),
        (lambda p: write_clip(p, frames=33), "too_few_frames", {"num_frames": 20, "frame_rate": 12}),
        (lambda p: write_clip(p, frames=9, size=(32, 24)), "too_small", {"size": (64, 24)}),
    ],
    ids=[
        "zero_byte",
        "truncated",
        "truncated_faststart",
        "random",
        "aac_only",
        "mp2_only",
        "few",
        "few_at_12fps",
        "small",
    ],
)
def test_unusable_videos_raise_media_error(tmp_path: Path, make, reason: str, kwargs: dict) -> None:
    path = tmp_path / "bad_sample.mp4"
    make(path)
    with pytest.raises(MediaError) as e:
        read(path, **kwargs)
    assert e.value.reason == reason
    assert "bad_sample.mp4" in str(e.value)
    if reason == "too_small":
        assert "32x24" in str(e.value) and "64x24" in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MediaError) as e:
        media.probe_video(tmp_path / "nope.mp4")
    assert e.value.reason == "not_found" and "nope.mp4" in str(e.value)


@pytest.mark.parametrize(
    ("codec", "pix_fmt", "suffix", "notice"),
    [
        ("libx264", "yuv420p10le", ".mp4", "10-bit"),
        ("ffv1", "yuv420p10le", ".mkv", "10-bit"),
        ("libx264", "yuv444p", ".mp4", "4:2:0"),
    ],
)
def test_high_bit_depth_and_444_decode_to_8bit_rgb(tmp_path: Path, codec: str, pix_fmt: str, suffix: str, notice: str):
    path = write_clip(tmp_path / f"hi{suffix}", frames=9, codec=codec, pix_fmt=pix_fmt)
    info = media.probe_video(path)
    assert info.pix_fmt == pix_fmt and info.bit_depth == (10 if "10" in pix_fmt else 8)
    assert any(notice in n for n in info.notices)
    frames = read(path, num_frames=9)
    assert frames.dtype == torch.uint8 and frames.shape == (9, 3, 48, 64)
    assert indices(frames) == list(range(9))


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_variable_frame_rate_is_resampled_by_timestamps(tmp_path: Path, suffix: str) -> None:
    pts_ms = [0, 40, 60, 120, 125, 200, 250, 330, 340, 400, 450]
    path = write_clip(tmp_path / f"vfr{suffix}", frames=len(pts_ms), pts_ms=pts_ms)
    info = media.probe_video(path)
    assert info.variable_frame_rate and any("variable frame rate" in n for n in info.notices)
    assert info.num_frames == 11 and info.duration_s == pytest.approx(0.5)
    assert media.frames_available(info, 20) == 10
    # output instants 0, 50, 100, ... ms take the source frame nearest in time
    assert indices(read(path, num_frames=10, frame_rate=20)) == [0, 1, 3, 4, 5, 6, 7, 8, 9, 10]
    assert read(path, num_frames=8, frame_rate=None).shape == (8, 3, 48, 64)  # VFR at its average rate


def test_exif_rotated_jpeg_comes_out_upright(tmp_path: Path) -> None:
    path = write_exif_jpeg(tmp_path / "phone.jpg", size=(64, 48), orientation=6)
    image = media.read_image(path, size=(48, 64))
    assert image.dtype == torch.uint8 and image.shape == (1, 3, 64, 48)
    assert marker_corner(image[0].numpy()) == "tr"
    assert media.first_frame(path).size == (48, 64)
    assert media.read_image(path, size=(24, 24)).shape == (1, 3, 24, 24)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b""), "zero_byte"),
        (lambda p: p.write_bytes(random.Random(1).randbytes(2048)), "corrupt"),
        (lambda p: p.write_bytes(_png_bytes(p)[:300]), "corrupt"),
        (lambda p: Image.new("RGB", (20, 20)).save(p, format="PNG"), "too_small"),
    ],
    ids=["zero_byte", "random", "truncated", "small"],
)
def test_unusable_images_raise_media_error(tmp_path: Path, make, reason: str) -> None:
    path = tmp_path / "bad_image.png"
    make(path)
    with pytest.raises(MediaError) as e:
        media.read_image(path, size=(32, 32))
    assert e.value.reason == reason and "bad_image.png" in str(e.value)


def _png_bytes(path: Path) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format="PNG")
    return path.read_bytes()


@pytest.mark.parametrize(("codec", "suffix"), [("libvpx-vp9", ".webm"), ("libx264", ".mkv"), ("mpeg4", ".mov")])
def test_other_containers_decode(tmp_path: Path, codec: str, suffix: str) -> None:
    path = write_clip(tmp_path / f"c{suffix}", frames=17, codec=codec)
    info = media.probe_video(path)
    assert (info.num_frames, info.width, info.height, info.variable_frame_rate) == (17, 64, 48, False)
    assert info.fps == pytest.approx(24)
    assert indices(read(path, num_frames=17)) == list(range(17))


def test_to_model_pixels() -> None:
    frames = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 5)
    pixels = media.to_model_pixels(frames)
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 2, 4, 5)
    assert (
        pixels[0].eq(-1).all()
        and pixels[1].eq(1).all()
        and pixels[2].allclose(torch.tensor(128 / 127.5 - 1), atol=1e-6)
    )


def test_write_video_round_trip_is_atomic(tmp_path: Path) -> None:
    source = read(write_clip(tmp_path / "src.mp4", frames=9), num_frames=9)
    out = tmp_path / "out" / "val.mp4"
    out.parent.mkdir()
    media.write_video(out, source, fps=16)
    assert [p.name for p in out.parent.iterdir()] == ["val.mp4"]  # no temp file left behind
    info = media.probe_video(out)
    assert (info.num_frames, info.fps, info.width, info.height) == (9, 16.0, 64, 48)
    assert indices(read(out, num_frames=9)) == list(range(9))
    with pytest.raises(ValueError):
        media.write_video(tmp_path / "odd.mp4", torch.zeros(2, 3, 5, 5, dtype=torch.uint8), fps=8)


def test_synthetic_dataset_is_deterministic_with_quoted_captions(tmp_path: Path) -> None:
    from hvtune.testing.synth import write_synthetic_dataset

    kw = {"clips": 3, "size": (64, 48), "num_frames": 9, "fps": 8, "image_every": 2}
    a = write_synthetic_dataset(tmp_path / "a", seed=0, **kw)
    b = write_synthetic_dataset(tmp_path / "b", seed=0, **kw)
    c = write_synthetic_dataset(tmp_path / "c", seed=1, **kw)
    assert [p.name for p in a] == ["clip_0000.mp4", "clip_0001.mp4", "still_0001.png", "clip_0002.mp4"]
    captions = [p.with_suffix(".txt").read_text() for p in a]
    assert captions == [p.with_suffix(".txt").read_text() for p in b]
    assert captions != [p.with_suffix(".txt").read_text() for p in c]
    assert any('reads "' in caption for caption in captions)
    assert not list((tmp_path / "a").glob(".*"))  # no temp files
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]  # media.write_video is reproducible
    assert media.read_image(a[2], size=(64, 48)).shape == (1, 3, 48, 64)
    assert read(a[0], num_frames=9).shape == (9, 3, 48, 64)
    assert not torch.equal(read(a[0], num_frames=9), read(c[0], num_frames=9))
    no_stills = write_synthetic_dataset(tmp_path / "d", seed=0, **{**kw, "image_every": 0})
    assert [p.read_bytes() for p in no_stills] == [p.read_bytes() for p in a if p.suffix == ".mp4"]
