"""Synthetic dataset: short h264 clips of one coloured shape moving over a gradient background, each with a caption.

Clip ``i`` is drawn from ``numpy.random.default_rng([seed, i, 0])`` (its optional still image from ``[seed, i, 1]``),
so the same seed gives the same captions and the same bytes (``media.write_video`` encodes reproducibly), and adding
clips or stills does not change the others.
Every third sample (offset by the seed) also shows a sign with a word on it, and its caption quotes that word
(``a sign that reads "HELLO"``): the ByT5 glyph encoder only sees quoted text, so those captions exercise it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from hvtune.files import atomic_path, write_text_atomic

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 70),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 30),
    "purple": (160, 60, 200),
    "white": (245, 245, 245),
    "cyan": (40, 210, 220),
}
BACKGROUNDS = {"black": (10, 10, 12), "dark grey": (55, 55, 60), "navy": (15, 25, 80), "dark green": (15, 60, 30)}
# motion name -> (x, y) position at time t in [0, 1], as fractions of the free area
MOTIONS = {
    "moving from left to right": lambda t: (t, 0.5),
    "moving from right to left": lambda t: (1 - t, 0.5),
    "moving from top to bottom": lambda t: (0.5, t),
    "moving from bottom to top": lambda t: (0.5, 1 - t),
    "moving diagonally": lambda t: (t, t),
    "circling around the centre": lambda t: (
        0.5 + 0.5 * math.cos(2 * math.pi * t),
        0.5 + 0.5 * math.sin(2 * math.pi * t),
    ),
}
WORDS = ("HELLO", "LORA", "OPEN", "STOP", "VIDEO", "SALE", "EXIT", "HUNYUAN")


def _draw_shape(draw: Any, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def _sample(seed: int, index: int, size: tuple[int, int], num_frames: int, still: bool = False) -> tuple[Any, str]:
    """(frames (F, 3, H, W) uint8, caption) of sample ``index``; ``still``: a caption without the motion."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng([seed, index, int(still)])
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    motion = list(MOTIONS)[rng.integers(len(MOTIONS))]
    word = WORDS[rng.integers(len(WORDS))] if (index + seed + still) % 3 == 0 else None
    width, height = size
    radius = min(width, height) / 7 * (0.8 + 0.4 * rng.random())
    # vertical gradient: the background colour at the top, 60% of it at the bottom
    fade = np.linspace(1.0, 0.6, height)[:, None, None]
    base = Image.fromarray((np.array(BACKGROUNDS[background])[None, None] * fade).repeat(width, 1).astype(np.uint8))
    sign_h = max(12, height // 6)
    if word:
        font = ImageFont.load_default(size=sign_h * 2 // 3)
        draw = ImageDraw.Draw(base)
        text_w = draw.textlength(word, font=font)
        box = ((width - text_w) / 2 - 6, 2, (width + text_w) / 2 + 6, 2 + sign_h)
        draw.rectangle(box, fill=(235, 225, 200), outline=(90, 60, 30), width=2)
        draw.text((width / 2, 2 + sign_h / 2), word, fill=(20, 20, 20), font=font, anchor="mm")
    top = (2 + sign_h) if word else 0
    frames = np.empty((num_frames, 3, height, width), np.uint8)
    for f in range(num_frames):
        x, y = MOTIONS[motion](f / max(1, num_frames - 1))
        img = base.copy()
        cx = radius + x * (width - 2 * radius)
        cy = top + radius + y * (height - top - 2 * radius)
        _draw_shape(ImageDraw.Draw(img), shape, cx, cy, radius, COLOURS[colour])
        frames[f] = np.asarray(img).transpose(2, 0, 1)
    article = "an" if colour[0] in "aeiou" else "a"
    caption = f"{article} {colour} {shape}{'' if still else ' ' + motion} over a {background} background"
    if word:
        caption += f', below a sign that reads "{word}"'
    return frames, caption


def write_synthetic_dataset(
    out_dir: str | os.PathLike[str],
    *,
    clips: int,
    seed: int = 0,
    size: tuple[int, int] = (320, 192),
    num_frames: int = 33,
    fps: float = 24,
    image_every: int = 0,
) -> list[Path]:
    """Write ``clips`` h264 clips ``clip_0000.mp4 ...`` with captions ``clip_0000.txt ...`` into ``out_dir``.
    With ``image_every=N > 0``, after every N-th clip one extra still image ``still_<clip index>.png`` (its own scene,
    caption without motion) is written too; stills never change the clips. Returns the media paths in order.
    ``size`` is (width, height) and must be even."""
    from PIL import Image

    from hvtune.data.media import write_video
    from hvtune.progress_lines import ProgressLines

    if size[0] % 2 or size[1] % 2:
        raise ValueError(f"size must be even for h264, got {size[0]}x{size[1]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for index in ProgressLines(clips, label="synthetic clips", unit="clip").each(range(clips)):
        frames, caption = _sample(seed, index, size, num_frames)
        clip = out / f"clip_{index:04d}.mp4"
        write_video(clip, frames, fps)
        write_text_atomic(clip.with_suffix(".txt"), caption)
        written.append(clip)
        if image_every > 0 and (index + 1) % image_every == 0:
            frames, caption = _sample(seed, index, size, 3, still=True)
            image = out / f"still_{index:04d}.png"
            with atomic_path(image) as tmp:
                Image.fromarray(frames[1].transpose(1, 2, 0)).save(tmp, format="PNG")
            write_text_atomic(image.with_suffix(".txt"), caption)
            written.append(image)
    return written
