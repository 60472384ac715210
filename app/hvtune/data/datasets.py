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
- The window of a longer clip is `media.choose_window(frames, F, seed, sha256 of the file)`: deterministic from the
  `seed` the cache is built with and the file's content (renaming a file does not move its window). The cache keeps
  those windows: training with another seed changes the noise, not the frames (rebuild the cache to move windows).

Buckets are data/buckets.py's rules, captions data/captions.py's, report codes data/issues.py's.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvtune.config.settings import DatasetConfig, ResolvedConfig
from hvtune.data.buckets import BucketRule, bucket_frames, dataset_bucket_rule, meets_minimum, simpletuner_bucket
from hvtune.data.captions import Captions
from hvtune.data.issues import DatasetError, Issue, notice_issue
from hvtune.data.probe import ProbeIndex, file_sha256, image_meta, video_info, video_meta
from hvtune.progress_lines import ProgressLines

CAPTION_EXTENSIONS = {".txt"}
METADATA_EXTENSIONS = {".json", ".jsonl", ".csv"}


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
    files: dict[str, tuple[Path, list[str]]] = field(default_factory=dict)  # dataset id -> (root, every file looked at)

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


def media_datasets(resolved: ResolvedConfig) -> list[DatasetConfig]:
    return [d for d in resolved.datasets if not d.skipped and d.dataset_type in ("video", "image")]


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


def candidate_files(ds: DatasetConfig, root: Path, links: list[tuple[Path, str, str]]) -> list[tuple[Path, str]]:
    """(path, rel) of every file of the dataset at `root` that the scan looks at: a sample or a skipped file, never a
    caption or caption table. The cache records them, so that training sees a clip added since."""
    meta_name = Path(ds.metadata_file).name if ds.metadata_file else None
    return [
        (p, rel)
        for p, rel in _walk(root, links)
        if p.suffix.lower() not in CAPTION_EXTENSIONS | METADATA_EXTENSIONS and p.name != meta_name
    ]


def scan(resolved: ResolvedConfig, *, probe_index: ProbeIndex | None = None, progress: bool = True) -> ScanResult:
    """Every enabled video/image dataset -> samples and report lines. Reads metadata only; never raises for a bad
    sample."""
    index = probe_index or ProbeIndex(None)
    result = ScanResult()
    for ds in media_datasets(resolved):
        _scan_dataset(ds, resolved, index, result, progress)
    return result


def _scan_dataset(
    ds: DatasetConfig, resolved: ResolvedConfig, index: ProbeIndex, result: ScanResult, progress: bool
) -> None:
    """One dataset's files -> samples and report lines, added to `result`."""
    from hvtune.data.media import MediaError

    result.datasets.append(ds.id)
    result.found[ds.id] = 0
    root = Path(ds.instance_data_dir or "").expanduser()
    if not root.is_dir():
        result.issues.append(Issue(ds.id, str(root), "skipped", "not_found", "instance_data_dir not found"))
        return
    captions = Captions(ds, root, resolved.config_path)
    if captions.metadata_path is not None:
        result.metadata_files.append(captions.metadata_path)
    for notice in captions.notices:
        result.issues.append(Issue(ds.id, str(root), "used", "metadata_line_ignored", notice))
    resolution = dataset_bucket_rule(ds, resolved)
    links: list[tuple[Path, str, str]] = []
    files = candidate_files(ds, root, links)
    result.files[ds.id] = (root, [rel for _, rel in files])
    result.issues += [Issue(ds.id, str(path), "skipped", reason, detail) for path, reason, detail in links]
    result.found[ds.id] += len(links)  # found, skipped: the summary's counts add up
    bar = ProgressLines(len(files), label=f"scan {ds.id}", unit="file", enabled=progress)
    for path, rel in bar.each(files):
        result.found[ds.id] += 1
        try:
            sample, notice = _sample(ds, path, rel, captions, index, resolution, resolved.train.seed)
        except (DatasetError, MediaError) as e:
            result.issues.append(Issue(ds.id, str(path), "skipped", e.reason, e.detail))
            continue
        except OSError as e:
            result.issues.append(
                Issue(ds.id, str(path), "skipped", "unreadable", f"cannot be read ({e.strerror or e})")
            )
            continue
        result.samples.append(sample)
        if notice is not None:
            result.issues.append(notice)


def _sample(
    ds: DatasetConfig,
    path: Path,
    rel: str,
    captions: Captions,
    index: ProbeIndex,
    resolution: BucketRule,
    seed: int,
) -> tuple[Sample, Issue | None]:
    """One file -> its sample and, when it needed a conversion, the "used" report line; raises DatasetError or
    MediaError (the skip reason) or OSError (unreadable)."""
    from hvtune.data.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, MediaError, choose_window, frames_available

    ext = path.suffix.lower()
    if ext not in VIDEO_EXTENSIONS and ext not in IMAGE_EXTENSIONS:
        raise DatasetError("unsupported_format", f"extension {ext or '(none)'} is neither a video nor an image we read")
    is_video = ext in VIDEO_EXTENSIONS
    if is_video and ds.dataset_type == "image":
        raise DatasetError("video_in_image_dataset", "a video in a dataset_type image dataset (split them)")
    caps = captions(path, rel)
    entry = index.get(path)
    if entry is None:
        if path.stat().st_size == 0:
            raise MediaError(path, "zero_byte", "file is empty (0 bytes)")
        meta = video_meta(path) if is_video else image_meta(path)
        entry = index.put(path, file_sha256(path), meta)
    info = video_info(path, entry) if is_video else None
    width, height = (info.width, info.height) if is_video else (entry["image"]["width"], entry["image"]["height"])
    size = _bucket_size(width, height, resolution)
    frames, start, rate = 1, 0, None
    if is_video:
        rate = ds.video.frame_rate
        available = frames_available(info, rate)
        frames = bucket_frames(available, ds)
        start = choose_window(available, frames, seed, entry["sha256"])
    sample = Sample(
        ds.id, path, rel, "video" if is_video else "image", caps, ds.repeats, size, frames, rate, start,
        entry["sha256"], info,
    )  # fmt: skip
    if is_video:
        return sample, notice_issue(ds.id, path, info.notices)
    o = entry["image"]["orientation"]
    notice = Issue(ds.id, str(path), "used", "exif_rotation", f"EXIF orientation {o} applied") if o != 1 else None
    return sample, notice


def _bucket_size(width: int, height: int, resolution: BucketRule) -> tuple[int, int]:
    """The (W, H) bucket of a width x height source; DatasetError("too_small") below the minimum or its bucket."""
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
    return size
