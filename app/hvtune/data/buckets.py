"""Buckets: the (W, H, F) a sample trains at, from its dataset's settings (SimpleTuner's rules).

Decisions (documented for users here and in the cache report):

- Buckets, spatial: SimpleTuner 4.10.1's rule (`simpletuner_bucket`, tested against the wheel's own
  helpers/multiaspect/image.py). A dataset's `resolution`/`resolution_type` fall back to the top-level ones;
  `resolution_type` defaults to `pixel_area` and `resolution` to the flavour's short side (480 or 720; SimpleTuner's
  1024 is kept different on purpose). `pixel_area` R is an area of R*R pixels (480 -> 0.2304 megapixels): the bucket
  keeps the source's aspect (rounded to `aspect_bucket_rounding` decimals) at that area, each side rounded to the
  nearest multiple of `aspect_bucket_alignment` (default 64: 1920x1080 -> 704x384 at 480). `pixel` R is the short
  edge (1920x1080 -> 832x512 at 480 with alignment 64, 848x480 with alignment 16). A bucket that comes out square is
  the square of the resolution's edge (areas near 0.25/0.5/1/2/4 megapixels use 512/768/1024/1536/2048).
  `crop: true` with `crop_aspect: square` trains every source at that square. A "WxH" resolution is hvtune's fixed
  size for every sample. `minimum_image_size` skips smaller sources (`too_small`). The source is scaled to cover the
  bucket and centre-cropped; it is never upscaled: a source smaller than its bucket is skipped (`too_small`), where
  SimpleTuner would upscale it.
- Buckets, frames (after resampling to `video.frame_rate` when set): `min_frames` defaults to `num_frames`
  (SimpleTuner). A clip with fewer than `min_frames` frames is skipped (`too_few_frames`); one with more than
  `max_frames` (when set) is skipped (`too_many_frames`). `aspect_ratio`: F = `num_frames`, or for a clip between
  `min_frames` and `num_frames` its own length rounded down to 4n+1. `resolution_frames`: F = min(frames,
  `num_frames`) with F-1 rounded down to a multiple of `frame_interval`, then F rounded down to 4n+1 (the model needs
  (F-1) % 4 == 0). The bucket is always (W, H, F): a batch never mixes sizes or lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hvtune.config.schema import parse_wxh
from hvtune.config.settings import DatasetConfig, ResolvedConfig
from hvtune.data.issues import DatasetError


@dataclass(frozen=True)
class BucketRule:
    """SimpleTuner's spatial bucket settings of one dataset, after its pixel_area -> area conversion."""

    resolution: float | tuple[int, int]  # pixel edge ("pixel"), megapixels ("area"), or a fixed (W, H)
    resolution_type: str  # "pixel" | "area" | "fixed"
    alignment: int = 64
    rounding: int = 2
    crop: bool = False
    crop_aspect: str = "square"
    minimum_image_size: float | None = None  # pixel edge ("pixel") or megapixels ("area")

    def describe(self) -> str:
        if self.resolution_type == "fixed":
            return "{}x{} fixed".format(*self.resolution)
        unit = "px edge" if self.resolution_type == "pixel" else "megapixels"
        crop = f", crop {self.crop_aspect}" if self.crop else ""
        return f"{self.resolution:g} {unit}, alignment {self.alignment}{crop}"


def _area_from_pixels(value: float | None) -> float | None:
    """pixel_area converts minimum/maximum_image_size and target_downsample_size above 10 to megapixels."""
    if value is None or value <= 10:
        return value
    return value * value / 1e6


def dataset_bucket_rule(ds: DatasetConfig, resolved: ResolvedConfig) -> BucketRule:
    """The dataset's `resolution`/`resolution_type`, falling back to the top-level ones as SimpleTuner's
    data_backend/factory.py does; "WxH" is hvtune's fixed size. pixel_area R becomes area R*R/1e6 megapixels
    (factory.py `_handle_resolution_conversion`)."""
    t = resolved.train
    if isinstance(ds.resolution, str):
        return BucketRule(parse_wxh(ds.resolution), "fixed")
    resolution = ds.resolution if ds.resolution is not None else t.resolution
    if resolution is None:
        resolution = min(t.flavour.resolution)
    kind = ds.resolution_type or t.resolution_type
    minimum = ds.minimum_image_size if ds.minimum_image_size is not None else t.minimum_image_size
    if kind == "pixel_area":
        resolution, kind, minimum = resolution * resolution / 1e6, "area", _area_from_pixels(minimum)
    return BucketRule(
        resolution, kind, t.aspect_bucket_alignment, t.aspect_bucket_rounding, ds.crop, ds.crop_aspect, minimum or None
    )


def _to_multiple(value: float, multiple: int) -> int:
    """SimpleTuner's MultiaspectImage._round_to_nearest_multiple (Python's round: halves go to even)."""
    return max(round(value / multiple) * multiple, multiple)


def _pixel_resolution(rule: BucketRule) -> int:
    """TrainingSample._set_resolution: the square edge; areas near 0.25/0.5/1/2/4 MP map to 512/768/1024/1536/2048."""
    if rule.resolution_type == "pixel":
        return int(rule.resolution)
    area = rule.resolution * 1e6
    for megapixels, edge in ((0.25, 512), (0.5, 768), (1.0, 1024), (2.0, 1536), (4.0, 2048)):
        if abs(rule.resolution - megapixels) < 0.05:
            area = edge * edge
            break
    return int(_to_multiple(math.sqrt(area), rule.alignment))


def simpletuner_bucket(width: int, height: int, rule: BucketRule) -> tuple[int, int]:
    """(W, H) SimpleTuner 4.10.1 trains a width x height source at: TrainingSample.calculate_target_size with
    MultiaspectImage.calculate_new_size_by_pixel_edge ("pixel") or calculate_new_size_by_pixel_area ("area")."""
    if rule.resolution_type == "fixed":
        return rule.resolution  # type: ignore[return-value]
    if rule.crop and rule.crop_aspect == "square":
        edge = _pixel_resolution(rule)
        return edge, edge
    aspect = round(width / height, rule.rounding)
    if rule.resolution_type == "pixel":
        res = int(rule.resolution)
        if width < height:
            w_t, h_t = res, int(res / aspect)
        else:
            h_t, w_t = res, int(res * aspect)
        size = (_to_multiple(w_t, rule.alignment), _to_multiple(h_t, rule.alignment))
    else:
        edge = _to_multiple(int(math.sqrt(rule.resolution * 1e6)), rule.alignment)
        if aspect == 1.0 and width == height:
            return edge, edge
        size = (
            _to_multiple(edge * math.sqrt(aspect), rule.alignment),
            _to_multiple(edge / math.sqrt(aspect), rule.alignment),
        )
    if round(size[0] / size[1], rule.rounding) == 1.0:
        edge = _pixel_resolution(rule)
        return edge, edge
    return size


def meets_minimum(width: int, height: int, rule: BucketRule) -> bool:
    """SimpleTuner's meets_resolution_requirements (helpers/metadata/backends/base.py) for minimum_image_size."""
    if rule.minimum_image_size is None or rule.resolution_type == "fixed":
        return True
    if rule.resolution_type == "pixel":
        return rule.minimum_image_size <= min(width, height)
    area = rule.minimum_image_size * 1e6
    if rule.crop and rule.crop_aspect == "square" and math.floor(math.sqrt(area)) > min(width, height):
        return False
    return area <= width * height


def round_to_4n1(n: int) -> int:
    return (n - 1) // 4 * 4 + 1 if n >= 1 else 0


def interval_frames(n: int, frame_interval: int) -> int:
    """`resolution_frames`: F-1 rounded down to a multiple of frame_interval, then F rounded down to 4n+1."""
    if n < 1:
        return 0
    return round_to_4n1((n - 1) // frame_interval * frame_interval + 1)


def bucket_frames(available: int, ds: DatasetConfig) -> int:
    """Frames to train on for a clip with `available` frames; raises DatasetError when the clip is not usable."""
    v = ds.video
    min_frames = v.min_frames if v.min_frames is not None else v.num_frames
    if available < min_frames:
        raise DatasetError("too_few_frames", f"has {available} frames, min_frames is {min_frames}")
    if v.max_frames is not None and available > v.max_frames:
        raise DatasetError("too_many_frames", f"has {available} frames, max_frames is {v.max_frames}")
    if v.bucket_strategy == "resolution_frames":
        frames = interval_frames(min(available, v.num_frames), v.frame_interval)
    else:
        frames = v.num_frames if available >= v.num_frames else round_to_4n1(available)
    if frames < 1:
        raise DatasetError("too_few_frames", f"has {available} frames, fewer than one usable 4n+1 window")
    return frames
