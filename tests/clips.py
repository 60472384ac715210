"""Builders for small real media files (PyAV / PIL), shared by the tests.

Every video frame ``i`` is a flat grey of level :func:`level` ``(i)`` with a white marker in its top-left quarter, so a
test can read back which source frame it got (:func:`frame_index`) and which way up it is (:func:`marker_corner`).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

_CODEC_OPTIONS = {
    "libx264": {"crf": "10"},
    "libvpx-vp9": {"crf": "10", "b": "0", "deadline": "realtime"},
    "mpeg4": {"b": "4M"},
}


def level(i: int) -> int:
    """Grey level of source frame ``i``: 16..232 in steps of 6 (inside the video range), repeating every 37 frames."""
    return 16 + 6 * (i % 37)


def clip_frame(i: int, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 frame ``i``: grey ``level(i)`` with a white top-left quarter."""
    frame = np.full((height, width, 3), level(i), np.uint8)
    frame[: height // 2, : width // 2] = 255
    return frame


def write_clip(
    path: Path,
    *,
    frames: int = 33,
    size: tuple[int, int] = (64, 48),
    fps: float = 24,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    rotation_cw: int = 0,
    pts_ms: list[int] | None = None,
    container_options: dict[str, str] | None = None,
) -> Path:
    """Encode a clip of :func:`clip_frame` frames. ``rotation_cw`` writes a display matrix asking players to rotate
    clockwise (what a phone writes for portrait video); ``pts_ms`` gives explicit presentation times in milliseconds
    (variable frame rate)."""
    width, height = size
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = dict(_CODEC_OPTIONS.get(codec, {}))
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation_cw:
            stream.set_display_rotation(-rotation_cw)  # PyAV takes counter-clockwise degrees
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(clip_frame(i, width, height), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_audio_only(path: Path, *, codec: str = "aac", seconds: float = 0.5, rate: int = 44100) -> Path:
    """A file with one audio stream (a sine tone) and no video."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        samples_per_frame = stream.codec_context.frame_size or 1024
        t = np.arange(int(seconds * rate)) / rate
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        fmt = stream.codec_context.format.name
        for start in range(0, len(tone) - samples_per_frame + 1, samples_per_frame):
            chunk = tone[start : start + samples_per_frame]
            data = chunk[None] if fmt == "fltp" else (chunk * 32767).astype(np.int16)[None]
            frame = av.AudioFrame.from_ndarray(data, format=fmt, layout="mono")
            frame.sample_rate, frame.pts = rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_exif_jpeg(path: Path, *, size: tuple[int, int] = (64, 48), orientation: int = 6) -> Path:
    """A landscape JPEG with the marker top-left and an EXIF orientation tag (6: display rotated 90 clockwise)."""
    img = Image.fromarray(clip_frame(0, *size))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, quality=95, exif=exif)
    return path


def frame_index(frame: np.ndarray) -> int:
    """Source frame index (mod 37) of a decoded ``(3, H, W)`` frame, from the grey of its bottom-right quarter."""
    h, w = frame.shape[-2:]
    grey = float(np.asarray(frame)[:, h - h // 4 :, w - w // 4 :].mean())
    return round((grey - 16) / 6)


def marker_corner(frame: np.ndarray) -> str:
    """Which quarter of a ``(3, H, W)`` frame holds the white marker: 'tl', 'tr', 'bl' or 'br'."""
    f = np.asarray(frame).astype(np.float32)
    h, w = f.shape[-2:]
    quads = {
        "tl": f[:, : h // 2, : w // 2],
        "tr": f[:, : h // 2, w - w // 2 :],
        "bl": f[:, h - h // 2 :, : w // 2],
        "br": f[:, h - h // 2 :, w - w // 2 :],
    }
    return max(quads, key=lambda k: quads[k].mean())
