"""Video and image loading for the datasets stage (PyAV for video, PIL for images).

Decisions:
- Every frame comes out as 8-bit RGB ``uint8``. 10/12-bit sources (``yuv420p10le`` ...) and sources without 4:2:0 chroma
  subsampling (``yuv444p``, ``yuv422p``) are accepted and converted by swscale using the frame's own colour matrix; the
  conversion is listed in ``VideoInfo.notices`` so the user learns about it.
- Rotation comes from the stream's display matrix and is applied (multiples of 90 degrees; flips in the matrix are
  ignored). ``VideoInfo.rotation`` is the clockwise angle a player applies (the old ``rotate`` tag: 90 for a portrait
  phone clip); ``width``/``height`` are the display size, after rotation.
- Frame-rate resampling works on presentation timestamps, not frame indices: output frame ``k`` shows the source frame
  whose timestamp is nearest to ``t0 + k / frame_rate`` (ties go to the earlier frame). So 48 fps -> 24 fps keeps every
  other frame, and variable-frame-rate (VFR) clips come out evenly spaced in time. A VFR clip read with
  ``frame_rate=None`` is resampled to its average rate; a constant-rate clip with ``frame_rate=None`` is read frame by
  frame.
- Resize keeps the aspect ratio: scale so the target is covered, then centre-crop. We never upscale: a source smaller
  than the target in either dimension raises ``MediaError(reason='too_small')``.
- Decoding streams frames and stops at the end of the chosen window; only the window (at target size) is held.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hvtune.errors import UserError
from hvtune.files import atomic_path

if TYPE_CHECKING:
    import torch
    from PIL import Image

VIDEO_EXTENSIONS = {".mp4", ".webm", ".mov", ".mkv"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class MediaError(UserError):
    """A sample that cannot be used. ``reason`` is a short stable code for skip reports (``not_found``, ``zero_byte``,
    ``corrupt``, ``unsupported_codec``, ``no_video_stream``, ``audio_only``, ``too_few_frames``, ``too_small``);
    ``str(e)`` is a sentence naming the file."""

    def __init__(self, path: str | os.PathLike[str], reason: str, detail: str) -> None:
        self.path, self.reason, self.detail = Path(path), reason, detail
        super().__init__(f"{path}: {detail}")


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int  # display size, after rotation
    height: int
    num_frames: int
    fps: float  # average rate
    duration_s: float  # from the first frame's timestamp to the end of the last frame
    rotation: int  # clockwise degrees applied for display: 0, 90, 180 or 270
    pix_fmt: str
    bit_depth: int
    variable_frame_rate: bool
    notices: tuple[str, ...]


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise MediaError(path, "not_found", "file not found")
    if path.stat().st_size == 0:
        raise MediaError(path, "zero_byte", "file is empty (0 bytes)")


def _open(path: Path) -> Any:
    import av

    _check_file(path)
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise MediaError(path, "corrupt", f"undecodable: cannot be opened as a video{_ffmpeg_detail(e)}") from e
    if not container.streams.video:
        audio = bool(container.streams.audio)
        container.close()
        if audio:
            raise MediaError(path, "audio_only", "has only audio, no video stream")
        raise MediaError(path, "no_video_stream", "has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container


def _ffmpeg_detail(e: Exception) -> str:
    """FFmpeg's own words, except an errno text: on garbage input its probe returns whatever errno its last reader
    left ("Operation not permitted", "Invalid argument"), which would send the user hunting a permission problem
    in a file that was opened fine. The file itself is the problem: it is corrupt or not a video."""
    if isinstance(e, OSError) and not isinstance(e, ValueError):
        return " (corrupt, or not a video file)"
    return f" ({getattr(e, 'strerror', None) or e}; corrupt, or not a video file)"


def _decode_error(path: Path, e: Exception) -> MediaError:
    import av

    if isinstance(e, av.error.DecoderNotFoundError):
        return MediaError(path, "unsupported_codec", f"no decoder for this codec ({e})")
    return MediaError(path, "corrupt", f"undecodable: frames cannot be decoded{_ffmpeg_detail(e)}")


def _rotation_cw(frame: Any) -> int:
    """Clockwise display rotation of a decoded frame, rounded to 0/90/180/270 (PyAV reports counter-clockwise)."""
    return round(-frame.rotation / 90) * 90 % 360


def _format_notices(pix_fmt: str, width: int, height: int) -> tuple[int, list[str]]:
    import av

    fmt = av.VideoFormat(pix_fmt, width, height)
    depth = max(c.bits for c in fmt.components)
    notices = [f"{depth}-bit {pix_fmt} converted to 8-bit RGB"] if depth > 8 else []
    planes = fmt.components  # Y, U, V[, A] for YUV formats (VideoFormatComponent.is_chroma is unreliable in PyAV 18)
    if not fmt.is_rgb and len(planes) >= 3 and (planes[1].width, planes[1].height) != (width // 2, height // 2):
        notices.append(f"{pix_fmt} (not 4:2:0 chroma) converted to RGB")
    return depth, notices


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Container and stream metadata. Packets are demuxed (read, not decoded) for their timestamps, which give the
    frame count, the duration and whether the rate is variable; only the first frame is decoded (rotation, pixel
    format). A file whose container index (mp4/mov) points past its end is reported as truncated."""
    import av

    path = Path(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        tb = float(stream.time_base)
        ticks: list[int] = []
        first = None
        try:
            for packet in container.demux(stream):
                tick = packet.pts if packet.pts is not None else packet.dts
                if packet.size and tick is not None:
                    ticks.append(tick)
                if first is None:
                    first = next(iter(packet.decode()), None)
        except av.FFmpegError as e:
            raise _decode_error(path, e) from e
        if first is None:
            raise MediaError(path, "corrupt", "no frame could be decoded")
        file_size = path.stat().st_size
        missing = sum(1 for e in stream.index_entries if e.pos >= 0 and e.pos + e.size > file_size)
        if missing:
            raise MediaError(path, "corrupt", f"truncated: {missing} frames in the container index lie past the end")
        ticks.sort()
        deltas = [b - a for a, b in itertools.pairwise(ticks)]
        median = sorted(deltas)[len(deltas) // 2] if deltas else 0
        vfr = any(abs(d - median) > max(1.5, 0.05 * median) for d in deltas)
        rate = stream.average_rate or stream.guessed_rate
        frame_s = median * tb if median else (1 / float(rate) if rate else 0.0)
        duration = (ticks[-1] - ticks[0]) * tb + frame_s if ticks else frame_s
        count = len(ticks) or 1
        fps = count / duration if (vfr or not rate) and duration else float(rate or 0)
        rotation = _rotation_cw(first)
        pix_fmt = first.format.name
    depth, notices = _format_notices(pix_fmt, first.width, first.height)
    w, h = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
    if first.rotation % 90:
        notices.append(f"rotation {-first.rotation} degrees rounded to {rotation}")
    if rotation:
        notices.append(f"rotation metadata ({rotation} degrees clockwise) applied")
    if vfr:
        notices.append("variable frame rate: resampled by presentation timestamps")
    return VideoInfo(path, w, h, count, fps, duration, rotation, pix_fmt, depth, vfr, tuple(notices))


def _effective_rate(info: VideoInfo, frame_rate: float | None) -> float | None:
    return frame_rate if frame_rate else (info.fps if info.variable_frame_rate else None)


def frames_available(info: VideoInfo, frame_rate: float | None) -> int:
    """How many frames the clip gives after resampling to ``frame_rate`` (``None``: native frames, or the average rate
    for VFR clips): the number of instants ``k / frame_rate`` inside ``[0, duration_s)``, ignoring an instant that falls
    in the last 5% of an output frame interval (container timestamp rounding would otherwise add a duplicate frame)."""
    rate = _effective_rate(info, frame_rate)
    return info.num_frames if rate is None else max(0, math.ceil(info.duration_s * rate - 0.05))


def choose_window(available: int, num_frames: int, seed: int, key: str) -> int:
    """Start index of a ``num_frames`` window out of ``available`` frames.

    Rule: ``int.from_bytes(sha256(f"{seed}:{key}")[:8], "big") % (available - num_frames + 1)``. Independent of any
    global RNG, so the same (seed, key) always picks the same window on every machine and process."""
    if num_frames < 1 or available < num_frames:
        raise ValueError(f"cannot choose {num_frames} frames out of {available}")
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (available - num_frames + 1)


def _rotate(rgb: Any, rotation: int) -> Any:
    import numpy as np

    return np.ascontiguousarray(np.rot90(rgb, k=(-rotation // 90) % 4)) if rotation else rgb


def _check_size(path: Path, width: int, height: int, size: tuple[int, int]) -> None:
    if width < size[0] or height < size[1]:
        raise MediaError(
            path,
            "too_small",
            f"source is {width}x{height}, smaller than the target {size[0]}x{size[1]} (we do not upscale)",
        )


def _fit(frames: torch.Tensor, size: tuple[int, int], path: Path) -> torch.Tensor:
    """(N, 3, h, w) uint8 -> (N, 3, H, W) uint8 with (W, H) = size: scale to cover, centre-crop, never upscale."""
    import torch

    tw, th = size
    h, w = frames.shape[-2:]
    _check_size(path, w, h, size)
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if (nw, nh) != (w, h):
        # uint8 + channels_last takes torch's fast CPU path (about 5x the float one) and saturates to 0..255 itself
        x = frames.contiguous(memory_format=torch.channels_last)
        frames = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return frames[..., top : top + th, left : left + tw].contiguous()


class _Window:
    """The window's frames as they are decoded, rotated and fitted to `size`; a source frame that resampling shows
    twice in a row is converted once."""

    def __init__(self, path: Path, size: tuple[int, int], rotation: int) -> None:
        self.path, self.size, self.rotation = path, size, rotation
        self.frames: list[torch.Tensor] = []
        self._last: tuple[int, torch.Tensor] | None = None  # (source index, fitted frame)

    def __len__(self) -> int:
        return len(self.frames)

    def add(self, index: int, frame: Any) -> None:
        import torch

        if self._last is None or self._last[0] != index:
            rgb = _rotate(frame.to_ndarray(format="rgb24"), self.rotation)
            self._last = (index, _fit(torch.from_numpy(rgb).permute(2, 0, 1)[None], self.size, self.path)[0])
        self.frames.append(self._last[1])


def _read_native(container: Any, path: Path, start: int, num_frames: int, window: _Window) -> None:
    """The window of a clip read frame by frame (no resampling): source frames `start` on."""
    import av

    try:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i >= start:
                window.add(i, frame)
            if len(window) == num_frames:
                break
    except av.FFmpegError as e:
        raise _decode_error(path, e) from e


def _read_resampled(
    container: Any, path: Path, info: VideoInfo, rate: float, start: int, num_frames: int, window: _Window
) -> None:
    """The window of a clip resampled to `rate` by presentation timestamps: output frame k is the source frame
    nearest to t0 + (start + k) / rate (ties go to the earlier frame; see the module docstring)."""
    import av

    prev: tuple[int, float, Any] | None = None  # (index, time, frame)
    targets: list[float] = []
    try:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            t = frame.time if frame.time is not None else i / info.fps
            if prev is None:
                targets = [t + (start + k) / rate for k in range(num_frames)]
            else:
                mid = (prev[1] + t) / 2
                while len(window) < num_frames and targets[len(window)] <= mid + 1e-9:
                    window.add(prev[0], prev[2])
            if len(window) == num_frames:
                break
            prev = (i, t, frame)
    except av.FFmpegError as e:
        raise _decode_error(path, e) from e
    if prev is not None:
        end = targets[0] - start / rate + info.duration_s  # t0 + duration
        while len(window) < num_frames and targets[len(window)] < end + 1e-6:
            window.add(prev[0], prev[2])


def read_video(
    path: str | os.PathLike[str],
    *,
    num_frames: int,
    size: tuple[int, int],
    frame_rate: float | None,
    seed: int,
    key: str,
    info: VideoInfo | None = None,
) -> torch.Tensor:
    """``num_frames`` frames as uint8 ``(F, 3, H, W)`` with ``(W, H) = size``; see the module docstring for the rules.
    Pass ``info`` from an earlier :func:`probe_video` to skip probing again."""
    import torch

    path = Path(path)
    info = info or probe_video(path)
    _check_size(path, info.width, info.height, size)
    rate = _effective_rate(info, frame_rate)
    available = frames_available(info, rate)
    if available < num_frames:
        at = f" at {rate:g} fps" if rate else ""
        raise MediaError(path, "too_few_frames", f"has {available} frames{at}, {num_frames} needed")
    start = choose_window(available, num_frames, seed, key)
    window = _Window(path, size, info.rotation)
    with _open(path) as container:
        if rate is None:
            _read_native(container, path, start, num_frames, window)
        else:
            _read_resampled(container, path, info, rate, start, num_frames, window)
    if len(window) < num_frames:
        raise MediaError(
            path,
            "corrupt",
            f"truncated: decoded {len(window)} of the {num_frames} frames needed (window starting at frame {start})",
        )
    return torch.stack(window.frames)


def _open_image(path: Path) -> Image.Image:
    from PIL import Image, ImageOps, UnidentifiedImageError

    _check_file(path)
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img).convert("RGB")  # alpha is dropped
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MediaError(path, "corrupt", f"cannot be read as an image ({e})") from e


def read_image(path: str | os.PathLike[str], *, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``(1, 3, H, W)``, EXIF orientation applied, same resize + crop and errors as :func:`read_video`."""
    import numpy as np
    import torch

    path = Path(path)
    rgb = np.asarray(_open_image(path))
    return _fit(torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None], size, path)


def first_frame(path: str | os.PathLike[str]) -> Image.Image:
    """First frame of a video (rotation applied) or the image itself (EXIF applied), as an RGB PIL image."""
    import av
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return _open_image(path)
    with _open(path) as container:
        try:
            frame = next(container.decode(container.streams.video[0]), None)
        except av.FFmpegError as e:
            raise _decode_error(path, e) from e
        if frame is None:
            raise MediaError(path, "corrupt", "no frame could be decoded")
        return Image.fromarray(_rotate(frame.to_ndarray(format="rgb24"), _rotation_cw(frame)))


def to_model_pixels(frames_uint8: torch.Tensor) -> torch.Tensor:
    """``(F, 3, H, W)`` uint8 -> ``(3, F, H, W)`` float32 in [-1, 1] (what the HunyuanVideo VAE expects)."""
    return frames_uint8.permute(1, 0, 2, 3).float().div(127.5).sub(1.0)


def write_video(path: str | os.PathLike[str], frames_uint8: Any, fps: float, *, crf: int = 18) -> None:
    """Write ``(F, 3, H, W)`` uint8 frames (tensor or array) as h264 yuv420p mp4, atomically (temp file + rename).
    Single-threaded so the same frames always give the same bytes."""
    import av
    import numpy as np

    path = Path(path)
    frames = np.asarray(frames_uint8.cpu() if hasattr(frames_uint8, "cpu") else frames_uint8)
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames of shape (F, 3, H, W), got {frames.dtype} {frames.shape}")
    height, width = frames.shape[2:]
    if width % 2 or height % 2:
        raise ValueError(f"h264 yuv420p needs even width and height, got {width}x{height}")
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # Reproducible bytes: libx264 output depends on its thread count, and with mb-tree it varied run to run
        # on tiny frames (seen with PyAV 18.1). One thread, no mb-tree: same frames -> same file on any machine.
        stream.options = {"crf": str(crf), "x264-params": "mbtree=0"}
        stream.codec_context.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame.transpose(1, 2, 0), format="rgb24")))
        container.mux(stream.encode(None))
