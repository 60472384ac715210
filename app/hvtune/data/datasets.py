"""Samples from the data-backend config: media files, captions, buckets and the reasons a file is not used.

Only metadata is read here (container index, image header, caption files); pixels are decoded later, one sample at a
time, by the cache builder. Every file the scan looks at ends in exactly one place: a `Sample`, or an `Issue` with
action "skipped" and a reason code. Samples that needed a conversion (rotation, EXIF orientation, 10-bit or 4:4:4
video, variable frame rate) are used and also get an `Issue` with action "used", so the report never hides them.

Decisions (documented for users in the module and the cache report):

- Files: `instance_data_dir` is walked recursively in sorted order of the relative POSIX path, following folder
  links; a folder reached twice (a link loop, or two links to one folder) is walked once and the other path reported
  (`folder_seen_twice`); a link to nothing is reported (`broken_link`). Hidden files (a name
  starting with "."), caption files (.txt) and metadata files (.json/.jsonl/.csv) are not samples; any other file whose
  extension is not a video (`media.VIDEO_EXTENSIONS`) or image (`media.IMAGE_EXTENSIONS`) is reported as
  `unsupported_format`. Images are one-frame samples, in image and in video datasets; a video inside an
  `dataset_type: image` dataset is skipped (`video_in_image_dataset`).
- Captions: `textfile` reads `<stem>.txt` beside the file; every non-empty line is one caption variant (SimpleTuner's
  multi-caption rule; the variant used for a draw is `draw % len(captions)`). `filename` uses the stem with `_` turned
  into spaces. `instanceprompt` uses `instance_prompt`. `metadata` reads `metadata_file` (jsonl objects or a csv with
  a header, columns `file` and `caption`; `file` is the path relative to `instance_data_dir`, or a bare file name).
  A caption that is not valid UTF-8 is REJECTED (`caption_not_utf8`, with the byte offset): decoding with replacement
  characters would silently train on text the user never wrote. A UTF-8 byte-order mark is accepted and dropped.
  Missing or whitespace-only captions are skipped (`missing_caption`, `empty_caption`).
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
- The window of a longer clip is `media.choose_window(frames, F, seed, sha256 of the file)`: deterministic from the
  `seed` the cache is built with and the file's content (renaming a file does not move its window). The cache keeps
  those windows: training with another seed changes the noise, not the frames (rebuild the cache to move windows).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hvtune.config.schema import DatasetConfig, parse_wxh
from hvtune.config.settings import ResolvedConfig
from hvtune.files import write_text_atomic

CAPTION_EXTENSIONS = {".txt"}
METADATA_EXTENSIONS = {".json", ".jsonl", ".csv"}
PATCH = 16  # VAE spatial compression = transformer patch grid: bucket sides are multiples of this


class DatasetError(Exception):
    """A sample (or a whole dataset's captions) cannot be used; `reason` is the report code."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(detail)


@dataclass
class Issue:
    """One report line: a skipped sample (action "skipped") or a used one that needed a conversion ("used")."""

    dataset: str
    source: str
    action: str
    reason: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class Sample:
    dataset: str
    source: Path  # absolute
    rel: str  # POSIX path relative to instance_data_dir
    kind: str  # "video" | "image"
    captions: list[str]
    repeats: int
    size: tuple[int, int]  # bucket (W, H)
    frames: int  # bucket F (1 for images)
    frame_rate: float | None  # resample rate for videos (None: native)
    start: int  # first frame of the window
    sha256: str  # of the file bytes
    info: Any = None  # media.VideoInfo for videos

    @property
    def bucket(self) -> tuple[int, int, int]:
        return (self.size[0], self.size[1], self.frames)

    @property
    def id(self) -> str:
        return f"{self.dataset}/{self.rel}"


@dataclass
class ScanResult:
    samples: list[Sample] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    found: dict[str, int] = field(default_factory=dict)  # dataset id -> files considered
    datasets: list[str] = field(default_factory=list)  # enabled media dataset ids, config order
    metadata_files: list[Path] = field(default_factory=list)  # caption tables read (caption_strategy metadata)

    @property
    def skipped(self) -> list[Issue]:
        return [i for i in self.issues if i.action == "skipped"]

    def skipped_by_reason(self) -> Counter:
        return Counter(i.reason for i in self.skipped)

    def used_by_dataset(self) -> Counter:
        return Counter(s.dataset for s in self.samples)

    def empty_datasets(self) -> list[str]:
        used = self.used_by_dataset()
        return [d for d in self.datasets if used[d] == 0]


# ------------------------------------------------------------------------------------------------------ buckets


def media_datasets(resolved: ResolvedConfig) -> list[DatasetConfig]:
    return [d for d in resolved.datasets if not d.skipped and d.dataset_type in ("video", "image")]


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


def dataset_resolution(ds: DatasetConfig, resolved: ResolvedConfig) -> BucketRule:
    return dataset_bucket_rule(ds, resolved)


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


# ----------------------------------------------------------------------------------------------------- captions


def _decode_caption(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(
            "caption_not_utf8",
            f"{where} is not valid UTF-8 (byte {e.start}: {data[e.start : e.start + 4]!r}); "
            "save it as UTF-8 (captions are rejected rather than decoded with replacement characters)",
        ) from e


def _split_captions(text: str, where: str) -> list[str]:
    lines = [" ".join(line.split()) for line in text.splitlines()]
    captions = [line for line in lines if line]
    if not captions:
        raise DatasetError("empty_caption", f"{where} is empty")
    return captions


class Captions:
    """Caption lookup for one dataset; `metadata` files are read once."""

    def __init__(self, ds: DatasetConfig, root: Path, config_path: Path | None):
        self.ds, self.root = ds, root
        self.table: dict[str, str] | None = None
        self.table_error: DatasetError | None = None
        self.notices: list[str] = []
        self.metadata_path: Path | None = None
        if ds.caption_strategy == "metadata":
            try:
                self.metadata_path = self._metadata_path(config_path)
                self.table = self._read_metadata(self.metadata_path)
            except DatasetError as e:
                self.table_error = e

    def _metadata_path(self, config_path: Path | None) -> Path:
        p = Path(self.ds.metadata_file or "").expanduser()
        candidates = [p] if p.is_absolute() else [self.root / p, Path.cwd() / p]
        if config_path is not None and not p.is_absolute():
            candidates += [config_path.parent / p, config_path.parent.parent / p]
        for c in candidates:
            if c.is_file():
                return c
        raise DatasetError("metadata_unreadable", f"metadata_file {self.ds.metadata_file} not found")

    def _read_metadata(self, path: Path) -> dict[str, str]:
        text = _decode_caption(path.read_bytes(), f"metadata_file {path}")
        rows: list[dict[str, Any]] = []
        if path.suffix.lower() == ".csv":
            rows = list(csv.DictReader(io.StringIO(text)))
        else:
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    self.notices.append(f"{path}:{n}: not JSON ({e.msg}); line ignored")
                    continue
                if isinstance(row, dict):
                    rows.append(row)
        table: dict[str, str] = {}
        for row in rows:
            name = row.get("file") or row.get("file_name")
            if name is None or row.get("caption") is None:
                continue
            table[Path(str(name)).as_posix()] = str(row["caption"])
        return table

    def _instance_prompts(self) -> list[str]:
        prompt = self.ds.instance_prompt
        if isinstance(prompt, list):
            return [p for p in (" ".join(str(x).split()) for x in prompt) if p] or _split_captions(
                "", "instance_prompt"
            )
        return _split_captions(prompt or "", "instance_prompt")

    def __call__(self, path: Path, rel: str) -> list[str]:
        """Captions with SimpleTuner's only_instance_prompt / prepend_instance_prompt (helpers/prompts.py)."""
        if self.ds.only_instance_prompt or self.ds.caption_strategy == "instanceprompt":
            return self._instance_prompts()
        captions = self._captions(path, rel)
        if self.ds.prepend_instance_prompt and self.ds.instance_prompt:
            prefix = self._instance_prompts()[0]
            captions = [f"{prefix} {c}" for c in captions]
        return captions

    def _captions(self, path: Path, rel: str) -> list[str]:
        strategy = self.ds.caption_strategy
        if strategy == "filename":
            return _split_captions(re.sub(r"[_]+", " ", path.stem), f"file name {path.name}")
        if strategy == "metadata":
            if self.table_error is not None:
                raise self.table_error
            assert self.table is not None
            caption = self.table.get(rel, self.table.get(path.name))
            if caption is None:
                raise DatasetError("missing_caption", f"no row for {rel} in metadata_file {self.ds.metadata_file}")
            return _split_captions(caption, f"caption of {rel} in metadata_file")
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            raise DatasetError("missing_caption", f"caption file {txt.name} not found beside it")
        return _split_captions(
            _decode_caption(txt.read_bytes(), f"caption file {txt.name}"), f"caption file {txt.name}"
        )


# --------------------------------------------------------------------------------------------------- probe index


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class ProbeIndex:
    """Remembers each source's content hash and metadata, trusted while (size, mtime_ns) are unchanged (the rule make
    and rsync use), so a fully cached rerun neither rehashes nor re-probes. `hvtune cache verify` rehashes entries."""

    VERSION = 1

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        self.used: set[str] = set()
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("version") == self.VERSION:
                    self.entries = data.get("files", {})
            except (OSError, ValueError, AttributeError):
                self.entries = {}

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int]:
        st = path.stat()
        return st.st_size, st.st_mtime_ns

    def get(self, path: Path) -> dict[str, Any] | None:
        entry = self.entries.get(str(path))
        if entry is None or tuple(entry["stamp"]) != self._stamp(path):
            return None
        self.used.add(str(path))
        return entry

    def put(self, path: Path, sha256: str, meta: dict[str, Any]) -> dict[str, Any]:
        entry = {"stamp": list(self._stamp(path)), "sha256": sha256, **meta}
        self.entries[str(path)] = entry
        self.used.add(str(path))
        return entry

    def save(self) -> None:
        if self.path is None:
            return
        kept = {k: v for k, v in sorted(self.entries.items()) if k in self.used}
        write_text_atomic(self.path, json.dumps({"version": self.VERSION, "files": kept}, sort_keys=True))


def _video_meta(path: Path) -> dict[str, Any]:
    from hvtune.data.media import probe_video

    info = probe_video(path)
    d = asdict(info)
    d["path"] = None
    d["notices"] = list(info.notices)
    return {"video": d}


def _video_info(path: Path, meta: dict[str, Any]):
    from hvtune.data.media import VideoInfo

    d = dict(meta["video"])
    d["path"], d["notices"] = path, tuple(d["notices"])
    return VideoInfo(**d)


def _image_meta(path: Path) -> dict[str, Any]:
    from PIL import Image, UnidentifiedImageError

    from hvtune.data.media import MediaError

    if path.stat().st_size == 0:
        raise MediaError(path, "zero_byte", "file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = int(img.getexif().get(0x0112, 1) or 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MediaError(path, "corrupt", f"cannot be read as an image ({e})") from e
    if orientation in (5, 6, 7, 8):  # EXIF transposes that swap width and height
        width, height = height, width
    return {"image": {"width": width, "height": height, "orientation": orientation}}


# ------------------------------------------------------------------------------------------------------------ scan


_NOTICE_CODES = (
    ("-bit", "high_bit_depth"),
    ("4:2:0", "chroma_converted"),
    ("rotation", "rotated"),
    ("variable frame rate", "variable_frame_rate"),
)


def _notice_issue(ds_id: str, path: Path, notices: tuple[str, ...] | list[str]) -> Issue | None:
    if not notices:
        return None
    codes: list[str] = []
    for text in notices:
        code = next((c for key, c in _NOTICE_CODES if key in text), "converted")
        if code not in codes:
            codes.append(code)
    return Issue(ds_id, str(path), "used", ",".join(codes), "; ".join(notices))


def _walk(root: Path, links: list[tuple[Path, str, str]]) -> list[tuple[Path, str]]:
    """Files under `root`, following folder links (clips are often linked in from another disk). A folder reached a
    second time - a link back to a parent (a loop) or a second link to the same folder - is not walked again, and a
    link to nothing is not a file: each is appended to `links` as (path, reason, detail) so the report names it."""
    files = []
    walked = {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        kept = []
        for name in sorted(dirnames):
            if name.startswith("."):
                continue
            real = os.path.realpath(os.path.join(dirpath, name))
            if real in walked:
                links.append((Path(dirpath) / name, "folder_seen_twice", f"links to {real}, already scanned"))
                continue
            walked.add(real)
            kept.append(name)
        dirnames[:] = kept
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.is_symlink() and not path.exists():
                links.append((path, "broken_link", f"a link to {os.readlink(path)}, which does not exist"))
                continue
            files.append((path, path.relative_to(root).as_posix()))
    files.sort(key=lambda t: t[1])
    return files


def scan(resolved: ResolvedConfig, *, probe_index: ProbeIndex | None = None, progress: bool = True) -> ScanResult:
    """Every enabled video/image dataset -> samples and report lines. Reads metadata only; never raises for a bad
    sample."""
    from tqdm import tqdm

    from hvtune.data.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, MediaError, choose_window, frames_available

    index = probe_index or ProbeIndex(None)
    seed = resolved.train.seed
    result = ScanResult()
    for ds in media_datasets(resolved):
        result.datasets.append(ds.id)
        result.found[ds.id] = 0
        root = Path(ds.instance_data_dir or "").expanduser()
        if not root.is_dir():
            result.issues.append(Issue(ds.id, str(root), "skipped", "not_found", "instance_data_dir not found"))
            continue
        captions = Captions(ds, root, resolved.config_path)
        if captions.metadata_path is not None:
            result.metadata_files.append(captions.metadata_path)
        for notice in captions.notices:
            result.issues.append(Issue(ds.id, str(root), "used", "metadata_line_ignored", notice))
        resolution = dataset_resolution(ds, resolved)
        meta_name = Path(ds.metadata_file).name if ds.metadata_file else None
        links: list[tuple[Path, str, str]] = []
        files = [
            (p, rel)
            for p, rel in _walk(root, links)
            if p.suffix.lower() not in CAPTION_EXTENSIONS | METADATA_EXTENSIONS and p.name != meta_name
        ]
        result.issues += [Issue(ds.id, str(path), "skipped", reason, detail) for path, reason, detail in links]
        result.found[ds.id] += len(links)  # found, skipped: the summary's counts add up
        bar = tqdm(files, desc=f"scan {ds.id}", unit="file", disable=not progress, dynamic_ncols=True)
        for path, rel in bar:
            result.found[ds.id] += 1
            ext = path.suffix.lower()

            def skip(reason: str, detail: str, path=path, ds_id=ds.id) -> None:
                result.issues.append(Issue(ds_id, str(path), "skipped", reason, detail))

            if ext not in VIDEO_EXTENSIONS and ext not in IMAGE_EXTENSIONS:
                skip("unsupported_format", f"extension {ext or '(none)'} is neither a video nor an image we read")
                continue
            is_video = ext in VIDEO_EXTENSIONS
            if is_video and ds.dataset_type == "image":
                skip("video_in_image_dataset", "a video in a dataset_type image dataset (split them)")
                continue
            try:
                caps = captions(path, rel)
                entry = index.get(path)
                if entry is None:
                    if path.stat().st_size == 0:
                        raise MediaError(path, "zero_byte", "file is empty (0 bytes)")
                    meta = _video_meta(path) if is_video else _image_meta(path)
                    entry = index.put(path, file_sha256(path), meta)
                if is_video:
                    info = _video_info(path, entry)
                    width, height = info.width, info.height
                else:
                    info = None
                    width, height = entry["image"]["width"], entry["image"]["height"]
                if not meets_minimum(width, height, resolution):
                    raise DatasetError(
                        "too_small", f"source is {width}x{height}, below minimum_image_size ({resolution.describe()})"
                    )
                size = simpletuner_bucket(width, height, resolution)
                if width < size[0] or height < size[1]:
                    raise DatasetError(
                        "too_small",
                        f"source is {width}x{height}, smaller than its bucket {size[0]}x{size[1]} (we do not upscale)",
                    )
                frames, start, rate = 1, 0, None
                if is_video:
                    rate = ds.video.frame_rate
                    available = frames_available(info, rate)
                    frames = bucket_frames(available, ds)
                    start = choose_window(available, frames, seed, entry["sha256"])
            except (DatasetError, MediaError) as e:
                skip(e.reason, e.detail)
                continue
            except OSError as e:
                skip("unreadable", f"cannot be read ({e.strerror or e})")
                continue
            sample = Sample(
                ds.id, path, rel, "video" if is_video else "image", caps, ds.repeats, size, frames, rate, start,
                entry["sha256"], info,
            )  # fmt: skip
            result.samples.append(sample)
            if is_video:
                notice = _notice_issue(ds.id, path, info.notices)
            else:
                o = entry["image"]["orientation"]
                notice = (
                    Issue(ds.id, str(path), "used", "exif_rotation", f"EXIF orientation {o} applied")
                    if o != 1
                    else None
                )
            if notice is not None:
                result.issues.append(notice)
        bar.close()
    return result
