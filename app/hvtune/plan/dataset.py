"""What `hvtune plan` knows of the user's data before anything is encoded: the samples a cache build would make (their
buckets and captions), and the longest caption a built cache holds.

Where the samples come from, first that applies:

1. The datasets' folders hold media: the cache build's own scan (`data.datasets.scan`) assigns their buckets, so the
   plan runs at the bucket training will meet. It reads the cache's probe index when there is one (a known, unchanged
   file costs one stat) and never writes it. A file the index does not know is probed (`data.probe.video_meta`:
   container metadata, packet timestamps, the first frame) but not hashed: the hash only places a clip's frame
   window, which the bucket does not depend on.
2. No media here, but a built cache whose manifest still matches the config (`cache.manifest.load_manifest`): its
   samples (a training box that holds the cache and not the clips).
3. Neither: no samples; the plan takes the largest bucket of the usual aspects (`shapes.usual_largest_bucket`).

Why the clips before the manifest: the manifest knows only the clips it was built from. A clip added since (perhaps
one with a larger bucket) or a bucket setting changed since is not in it, while the scan, with the probe index the
build left, costs about as much as reading the manifest for the clips already cached (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvtune.cache.layout import CacheLayout
from hvtune.cache.store import CacheError
from hvtune.config.layering import resolve_path
from hvtune.config.settings import ResolvedConfig
from hvtune.data.datasets import media_datasets, scan
from hvtune.data.probe import ProbeIndex, image_meta, video_meta

PROBE_THREADS = 8  # files probed at once by plan's scan (bench_plan_scan: 1.7x faster on 2 cores than one at a time)
UNHASHED = "not hashed by hvtune plan"  # the sha256 the plan's scan gives a file the probe index does not know


@dataclass(frozen=True)
class PlannedSample:
    """One sample a cache build would make: what its entries' sizes depend on."""

    id: str  # dataset/relative path, as the cache names it
    dataset: str
    kind: str  # "video" | "image"
    bucket: tuple[int, int, int]  # (W, H, F)
    captions: tuple[str, ...]


@dataclass
class PlannedData:
    """The samples `hvtune plan` found and where it found them."""

    samples: list[PlannedSample]
    origin: str  # "clips" | "manifest" | "none"
    where: str  # the folders scanned, or the cache read
    skipped: int = 0  # files the scan found but a build would skip

    @property
    def largest_bucket(self) -> tuple[int, int, int] | None:
        """(W, H, F) with the most latent tokens (pixels x latent frames), ties to the larger size."""
        if not self.samples:
            return None
        return max((s.bucket for s in self.samples), key=lambda b: (b[0] * b[1] * ((b[2] - 1) // 4 + 1), b))

    def describe(self) -> str:
        """Where the plan's bucket came from, as the plan prints it."""
        if self.origin == "clips":
            skipped = f", {self.skipped} file(s) a build would skip" if self.skipped else ""
            return f"the largest bucket of {len(self.samples)} clip(s) in {self.where}{skipped}"
        if self.origin == "manifest":
            return f"the largest bucket of {len(self.samples)} sample(s) in the cache manifest {self.where}"
        return f"no clips found at {self.where}: the largest of the usual aspects (16:9, 9:16, 4:3, 3:4, 1:1)"


class _MetadataIndex(ProbeIndex):
    """The cache's probe index, read and never saved; a file it does not know is probed and not hashed. `prefetch`
    probes the files the index does not know on a few threads first (PyAV releases the GIL while it demuxes and
    decodes); the scan then takes their results, or the error a probe raised, in its own order."""

    def __init__(self, path: Path | None):
        super().__init__(path)
        self.probed: dict[Path, dict[str, Any] | Exception] = {}

    def prefetch(self, folders: list[Path]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from hvtune.data.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

        media = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS
        paths = []
        for root in folders:
            for d, dirs, names in os.walk(root, followlinks=True):
                dirs[:] = [n for n in dirs if not n.startswith(".")]  # as the scan walks
                paths += [Path(d) / f for f in names if Path(f).suffix.lower() in media and not f.startswith(".")]
        paths = [p for p in paths if ProbeIndex.get(self, p) is None]
        with ThreadPoolExecutor(max_workers=min(PROBE_THREADS, os.cpu_count() or 1)) as pool:
            self.probed.update(zip(paths, pool.map(_probe, paths), strict=True))

    def get(self, path: Path) -> dict[str, Any] | None:
        entry = super().get(path)
        if entry is not None:
            return entry
        found = self.probed.pop(path, None) or _probe(path)
        if isinstance(found, Exception):
            raise found
        return found


def _probe(path: Path) -> dict[str, Any] | Exception:
    """The index entry of an unknown file, without its hash; the error a probe raises is returned, not raised."""
    from hvtune.data.media import VIDEO_EXTENSIONS

    try:
        meta = video_meta(path) if path.suffix.lower() in VIDEO_EXTENSIONS else image_meta(path)
    except Exception as e:  # raised again by `get`, where the scan sorts it into a skip reason
        return e
    return {"stamp": None, "sha256": UNHASHED, **meta}


def with_data_dirs_resolved(resolved: ResolvedConfig) -> ResolvedConfig:
    """The config with every dataset's instance_data_dir resolved as `load_config` resolves it when it checks paths
    (against the working directory, then beside the config file): a config loaded without that check finds the
    same folders."""
    datasets = [
        d.model_copy(update={"instance_data_dir": str(resolve_path(d.instance_data_dir, resolved.config_path))})
        if d.instance_data_dir
        else d
        for d in resolved.datasets
    ]
    return dataclasses.replace(resolved, datasets=datasets)


def data_folders(resolved: ResolvedConfig) -> list[str]:
    return [d.instance_data_dir or "(no instance_data_dir)" for d in media_datasets(resolved)]


def _shown(folders: list[str]) -> str:
    return ", ".join(str(Path(f).expanduser().absolute()) for f in folders)


def scan_clips(resolved: ResolvedConfig) -> PlannedData:
    """The samples the cache build's scan makes of the datasets' folders (metadata only, nothing written)."""
    resolved = with_data_dirs_resolved(resolved)
    index = _MetadataIndex(CacheLayout(resolved).probe_index_path)
    index.prefetch([Path(d).expanduser() for d in data_folders(resolved) if Path(d).expanduser().is_dir()])
    result = scan(resolved, probe_index=index, progress=False)
    samples = [
        PlannedSample(s.id, s.dataset, s.kind, s.bucket, tuple(s.captions)) for s in result.samples
    ]  # fmt: skip
    return PlannedData(samples, "clips", _shown(data_folders(resolved)), len(result.skipped))


def matching_manifest(resolved: ResolvedConfig):
    """(the built cache's manifest, or None; why not, as the plan prints it). Only a cache that still matches the
    config counts (`load_manifest`'s checks, less the encoders': a planning machine need not hold them)."""
    from hvtune.cache.manifest import load_manifest

    layout = CacheLayout(resolved)
    if not layout.manifest_path.is_file():
        return None, f"no built cache at {layout.root.expanduser().absolute()}"
    try:
        return load_manifest(resolved, check_encoders=False), ""
    except CacheError as e:
        first = (str(e).splitlines()[1:2] or [str(e)])[0].strip(" -")
        return None, f"the cache at {layout.root.expanduser().absolute()} does not match the config: {first}"


def manifest_samples(resolved: ResolvedConfig) -> PlannedData | None:
    """The samples of a built cache that still matches the config, or None (no cache, or an outdated one)."""
    manifest, _ = matching_manifest(resolved)
    if manifest is None:
        return None
    samples = [
        PlannedSample(s.id, s.dataset, "video" if s.bucket[2] > 1 else "image", s.bucket, tuple(s.captions))
        for s in manifest.samples
    ]
    return PlannedData(samples, "manifest", str(manifest.path))


def planned_data(resolved: ResolvedConfig) -> PlannedData:
    """The samples a cache build would make: from the clips, else a matching cache's manifest, else none."""
    clips = scan_clips(resolved)
    if clips.samples:
        return clips
    cached = manifest_samples(resolved)
    if cached is not None and cached.samples:
        return cached
    folders = data_folders(with_data_dirs_resolved(resolved))
    return PlannedData([], "none", _shown(folders) or "(no video or image dataset)", clips.skipped)


def cached_caption_tokens(resolved: ResolvedConfig) -> tuple[int, int, str]:
    """(longest Qwen tokens, longest ByT5 tokens, where) of the training captions of a built cache that still
    matches the config, read from its text entries' headers; (0, 0, why not) without one. The two are maxima over
    all captions: a batch pads each to its longest."""
    from safetensors import safe_open

    manifest, why = matching_manifest(resolved)
    if manifest is None or not manifest.samples:
        return 0, 0, why or f"the cache at {CacheLayout(resolved).root} holds no samples"
    qwen = byt5 = 0
    for key in {k for s in manifest.samples for k in s.text_keys}:
        with safe_open(manifest.text_path(key), framework="numpy") as f:
            qwen = max(qwen, f.get_slice("prompt_embeds").get_shape()[0])
            byt5 = max(byt5, f.get_slice("prompt_embeds_2").get_shape()[0])
    return qwen, byt5, f"the longest text entry of the cache at {manifest.path.parent}"
