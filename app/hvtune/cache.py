"""Content-addressed caches: text embeddings, VAE latents, i2v conditions, validation prompts; the manifest.

`hvtune cache` runs `build_cache` once so that training never loads the text encoders, the VAE encoder or SigLIP.

Keys. Every entry's key is the sha256 of a canonical JSON document holding the cache format version, what the entry
is, its input (the caption text, or the sha256 of the source file's bytes), every processing parameter (bucket size,
frames, window start, frame rate, pixel pipeline version, prompt template, token limits, dtype, VAE tiling / slicing /
patch-conv) and the identity of every encoder involved (class, a hash of every file in its folder - small files whole,
weight files by size + first and last MiB - and the hub commit when it came from the hub). Same inputs -> same key on
any machine; any change -> a new key. Keys never contain paths: renaming or moving files changes nothing.

Layout. One safetensors file per entry at `<root>/<key[:2]>/<key>.safetensors`, written to a temp file in the same
folder, fsynced, then renamed: a killed run leaves complete entries or none (stray temp files are removed by the next
run). Each root has an `index.json` (key -> kind, bytes, sha256, label) written at the end of a run; `verify_cache`
rehashes against it. Roots: text entries in the default `text_embeds` dataset's `cache_dir` (else
`<cache_dir>/text`); latents and SigLIP entries in each dataset's `cache_dir_vae` (else `<cache_dir>/vae/<id>`);
validation conditions in `<cache_dir>/validation`. `<cache_dir>/manifest.json` lists the samples and settings for
the trainer, `<cache_dir>/cache_report.jsonl` every skipped sample (and every converted one) with its reason.

Entries. text: `prompt_embeds` (L, D) = Qwen2.5-VL hidden_states[-3] with the 108-token template prefix dropped and
`prompt_embeds_2` (L2, D2) = ByT5 over the quoted text, both valid tokens only (L2 is 0 without quoted text); computed
by the diffusers pipeline's own `_get_mllm_prompt_embeds` / `_get_byt5_prompt_embeds`, one caption at a time (so a
value never depends on what it was batched with). latent: `latents` (32, F', H', W') = VAE mode * scaling_factor of
pixels in [-1, 1]; i2v adds `cond_latents` (32, 1, H', W') = the pipeline's `_get_image_latents` on the window's first
frame. siglip (i2v): `image_embeds` (N, Dv) = the pipeline's `_get_image_embeds` on the same frame.

Memory. Encoders are loaded one group at a time - the text encoders, then the VAE, then SigLIP - each only when it
has misses, and freed before the next. Clips are decoded one at a time (one decoded ahead on a helper thread) and
never held, so peak memory does not grow with the dataset.

VAE patch convolution. diffusers 0.42.1 has no patch-conv option on `AutoencoderKLHunyuanVideo15`; SimpleTuner's
`vae_enable_patch_conv` swaps the VAE's causal Conv3d for one that splits its input along time when it is large
(Tencent's `PatchCausalConv3d`). `enable_patch_conv` does the same to the diffusers VAE: each causal conv's Conv3d
runs on overlapping time chunks (kernel-1 frames of overlap, so the result is the same convolution) whenever its input
exceeds `PATCH_CONV_BYTES`.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ResolvedConfig, UserError
from .datasets import Issue, ProbeIndex, Sample, ScanResult, dataset_resolution, media_datasets, scan
from .files import atomic_path, is_temp_name, write_bytes_atomic, write_text_atomic

FORMAT = "hvtune-cache/1"
PIXELS = "media/1:rgb24,cover,center-crop,bicubic-antialias,no-upscale"  # bump when media's pixel output changes
TEXT_MAX_LENGTH = 1000  # the pipeline's tokenizer_max_length (Qwen tokens after the template prefix)
TEXT_CROP_START = 108  # the pipeline's prompt_template_encode_start_idx
TEXT_HIDDEN_LAYER = -3  # the pipeline reads hidden_states[-(2 + 1)]
TEXT_2_MAX_LENGTH = 256  # the pipeline's tokenizer_2_max_length (ByT5)
PATCH_CONV_BYTES = 1 << 30  # patch conv splits a causal conv's input above this size
TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
VISION_COMPONENTS = ("image_encoder", "feature_extractor")
COMPONENT_CLASSES = {
    "text_encoder": "Qwen2_5_VLTextModel",
    "tokenizer": "Qwen2Tokenizer",
    "text_encoder_2": "T5EncoderModel",
    "tokenizer_2": "ByT5Tokenizer",
    "vae": "AutoencoderKLHunyuanVideo15",
    "image_encoder": "SiglipVisionModel",
    "feature_extractor": "SiglipImageProcessor",
}


class CacheError(UserError):
    """The cache is missing, stale or incomplete, or a dataset has nothing usable; the message says what to run."""


# ------------------------------------------------------------------------------------------------------------- keys


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def make_key(kind: str, **parts: Any) -> str:
    """sha256 of the canonical JSON of (format, kind, parts)."""
    return hashlib.sha256(_canonical({"format": FORMAT, "kind": kind, **parts})).hexdigest()


def system_message() -> str:
    """The pipeline's default system message for the Qwen chat template, read from its signature."""
    import inspect

    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import HunyuanVideo15Pipeline

    return inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default


def text_params(dtype: str) -> dict[str, Any]:
    """The prompt-encoding parameters in text keys. The pipeline code itself (chat template, system message, glyph
    extraction) is keyed by the diffusers version, so a fully cached rerun need not import diffusers."""
    from importlib.metadata import version

    return {
        "max_length": TEXT_MAX_LENGTH,
        "crop_start": TEXT_CROP_START,
        "hidden_layer": TEXT_HIDDEN_LAYER,
        "max_length_2": TEXT_2_MAX_LENGTH,
        "pipeline": f"diffusers {version('diffusers')} HunyuanVideo15Pipeline",
        "dtype": dtype,
    }


def text_key(caption: str, text_identity: dict[str, Any], params: dict[str, Any]) -> str:
    return make_key("text", caption=caption, encoders=text_identity, params=params)


def sample_params(sample: Sample) -> dict[str, Any]:
    """Everything that decides a sample's pixels."""
    return {
        "source_sha256": sample.sha256,
        "media": sample.kind,
        "size": list(sample.size),
        "frames": sample.frames,
        "start": sample.start,
        "frame_rate": sample.frame_rate,
        "pixels": PIXELS,
    }


def latent_key(pixels: dict[str, Any], vae_identity: dict[str, Any], vae_options: dict[str, Any], i2v: bool) -> str:
    return make_key("latent", pixels=pixels, vae=vae_identity, options=vae_options, cond_latents=i2v)


def siglip_key(pixels: dict[str, Any], vision_identity: dict[str, Any], dtype: str) -> str:
    return make_key("siglip", pixels=pixels, vision=vision_identity, dtype=dtype)


def _file_fingerprint(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        if size <= 4 << 20:
            h.update(f.read())
        else:
            h.update(f.read(1 << 20))
            f.seek(size - (1 << 20))
            h.update(f.read(1 << 20))


def component_identity(name: str, path: Path, revision: str | None = None) -> dict[str, Any]:
    """Class, a hash of the folder's files (small ones whole, big ones by size + first and last MiB), hub commit."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            _file_fingerprint(p, h)
    return {"class": COMPONENT_CLASSES.get(name, name), "files_sha256": h.hexdigest(), "revision": revision}


def identities(paths, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    commits = {v for v in paths.revisions.values() if v}
    out = {}
    for name in names:
        path = paths[name]
        revision = path.parent.name if path.parent.name in commits else None
        out[name] = component_identity(name, path, revision)
    return out


# ---------------------------------------------------------------------------------------------------------- entries


def entry_path(root: Path, key: str) -> Path:
    return Path(root) / key[:2] / f"{key}.safetensors"


def write_entry(root: Path, key: str, tensors: dict[str, Any], meta: dict[str, str]) -> tuple[int, str]:
    """Atomic: temp file in the entry's folder, fsync, rename. Returns (bytes, sha256)."""
    from safetensors.torch import save

    path = entry_path(root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    # one metadata key holding canonical JSON: safetensors writes several keys in a per-process hash order, and the
    # same entry must be the same bytes whichever process wrote it
    info = json.dumps({"format": FORMAT, "key": key, **meta}, sort_keys=True, ensure_ascii=False)
    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata={"hvtune": info})
    return write_bytes_atomic(path, data), hashlib.sha256(data).hexdigest()


def read_entry(root: Path, key: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(entry_path(root, key))


def _clean_temp(root: Path) -> None:
    """Remove temp files a killed run left in the entry folders."""
    if not root.is_dir():
        return
    with os.scandir(root) as shards:
        for shard in shards:
            if shard.is_dir() and len(shard.name) == 2:
                with os.scandir(shard.path) as files:
                    for f in files:
                        if is_temp_name(f.name):
                            Path(f.path).unlink(missing_ok=True)


class RootIndex:
    """`<root>/index.json`: key -> {kind, bytes, sha256, label}. Rewritten at the end of a run."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / "index.json"
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if data.get("format") == FORMAT:
                    self.entries = data.get("entries", {})
            except (OSError, ValueError, AttributeError):
                self.entries = {}

    def add(self, key: str, kind: str, label: str, nbytes: int | None = None, sha: str | None = None) -> None:
        if nbytes is None or sha is None:
            known = self.entries.get(key)
            path = entry_path(self.root, key)
            if known and known.get("bytes") == path.stat().st_size:
                nbytes, sha = known["bytes"], known["sha256"]
            else:
                data = path.read_bytes()
                nbytes, sha = len(data), hashlib.sha256(data).hexdigest()
        self.entries[key] = {"kind": kind, "bytes": nbytes, "sha256": sha, "label": label[:200]}

    def save(self) -> int:
        kept = {k: v for k, v in sorted(self.entries.items()) if entry_path(self.root, k).is_file()}
        data = json.dumps({"format": FORMAT, "entries": kept}, sort_keys=True, indent=0, ensure_ascii=False)
        return write_text_atomic(self.path, data)


# -------------------------------------------------------------------------------------------------------- settings


def cache_dir(resolved: ResolvedConfig) -> Path:
    return Path(resolved.train.cache_dir).expanduser()


def text_root(resolved: ResolvedConfig) -> Path:
    for ds in resolved.datasets:
        if ds.dataset_type == "text_embeds" and ds.default and not ds.disabled and ds.cache_dir:
            return Path(ds.cache_dir).expanduser()
    return cache_dir(resolved) / "text"


def vae_root(resolved: ResolvedConfig, dataset_id: str) -> Path:
    for ds in resolved.datasets:
        if ds.id == dataset_id and ds.cache_dir_vae:
            return Path(ds.cache_dir_vae).expanduser()
    return cache_dir(resolved) / "vae" / dataset_id


def validation_root(resolved: ResolvedConfig) -> Path:
    return cache_dir(resolved) / "validation"


def vae_options(resolved: ResolvedConfig, dtype: str) -> dict[str, Any]:
    t = resolved.train
    return {
        "tiling": t.vae_enable_tiling,
        "slicing": t.vae_enable_slicing,
        "patch_conv": t.vae_enable_patch_conv,
        "patch_conv_bytes": PATCH_CONV_BYTES if t.vae_enable_patch_conv else None,
        "dtype": dtype,
    }


def cache_settings(resolved: ResolvedConfig) -> dict[str, Any]:
    """What training needs the cache to match in the config (compared by `load_manifest`). Left out on purpose:
    paths (the cache is content-addressed; a training machine need not hold the clips or encoders at the same paths);
    `seed` (it picks the clip windows when `hvtune cache` runs - recorded as the manifest's `window_seed` - and training
    with another seed keeps those windows and changes only the noise); the VAE tiling / slicing / patch-conv memory
    options (they are in the entry keys, so `hvtune cache` re-encodes when they change, but the trainer accepts latents
    encoded either way)."""
    t = resolved.train
    datasets = []
    for ds in media_datasets(resolved):
        res = dataset_resolution(ds, resolved)
        entry: dict[str, Any] = {
            "id": ds.id,
            "dataset_type": ds.dataset_type,
            "resolution": list(res) if isinstance(res, tuple) else res,
            "caption_strategy": ds.caption_strategy,
            "repeats": ds.repeats,
        }
        if ds.caption_strategy == "instanceprompt":
            entry["instance_prompt"] = ds.instance_prompt
        if ds.dataset_type == "video":
            v = ds.video
            entry["video"] = {
                "num_frames": v.num_frames,
                "min_frames": v.min_frames,
                "max_frames": v.max_frames,
                "frame_rate": v.frame_rate,
                "bucket_strategy": v.bucket_strategy,
                "frame_interval": v.frame_interval,
            }
        datasets.append(entry)
    settings: dict[str, Any] = {
        "format": FORMAT,
        "task": resolved.task,
        "datasets": datasets,
        "validation": {"prompt": t.validation_prompt, "negative_prompt": t.validation_negative_prompt},
    }
    if resolved.task == "i2v":
        settings["validation"]["image"] = t.validation_image
        settings["validation"]["resolution"] = t.validation_resolution
    return settings


def _diff(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k), new.get(k), f"{where}.{k}" if where else str(k))
        return out
    if isinstance(old, list) and isinstance(new, list) and all(isinstance(x, dict) and "id" in x for x in old + new):
        a, b = {x["id"]: x for x in old}, {x["id"]: x for x in new}
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            out += _diff(a.get(k), b.get(k), f"{where}[{k}]")
        if not out and [x["id"] for x in old] != [x["id"] for x in new]:
            out.append(f"{where}: dataset order {[x['id'] for x in old]} -> {[x['id'] for x in new]}")
        return out
    return [] if old == new else [f"{where}: cache built with {old!r}, config now {new!r}"]


# ----------------------------------------------------------------------------------------------------------- manifest


@dataclass
class ManifestSample:
    index: int
    id: str
    dataset: str
    source: str
    caption: str
    captions: list[str]
    text_key: str
    text_keys: list[str]
    latent_key: str
    image_key: str | None
    bucket: tuple[int, int, int]
    repeats: int

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "id": self.id,
            "dataset": self.dataset,
            "source": self.source,
            "caption": self.caption,
            "captions": self.captions,
            "text_key": self.text_key,
            "text_keys": self.text_keys,
            "latent_key": self.latent_key,
            "image_key": self.image_key,
            "bucket": list(self.bucket),
            "repeats": self.repeats,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ManifestSample:
        return cls(**{**d, "bucket": tuple(d["bucket"])})


@dataclass
class Manifest:
    path: Path
    task: str
    fingerprint: str
    samples_hash: str
    samples: list[ManifestSample]
    text_root: Path
    vae_roots: dict[str, Path]
    validation_root: Path
    validation_prompt_key: str
    validation_negative_key: str
    empty_prompt_key: str
    validation_image: dict[str, str] | None
    data: dict[str, Any] = field(repr=False)

    def text_path(self, key: str) -> Path:
        return entry_path(self.text_root, key)

    def latent_path(self, sample: ManifestSample) -> Path:
        return entry_path(self.vae_roots[sample.dataset], sample.latent_key)

    def image_path(self, sample: ManifestSample) -> Path | None:
        return entry_path(self.vae_roots[sample.dataset], sample.image_key) if sample.image_key else None

    def entry_files(self) -> list[tuple[str, Path]]:
        """(what, path) of every entry the manifest needs."""
        files = []
        for key, what in (
            (self.validation_prompt_key, "validation prompt"),
            (self.validation_negative_key, "validation negative prompt"),
            (self.empty_prompt_key, "empty caption"),
        ):
            files.append((f"text entry for the {what}", self.text_path(key)))
        for s in self.samples:
            for k in dict.fromkeys(s.text_keys):
                files.append((f"text entry of sample {s.id}", self.text_path(k)))
            files.append((f"latent entry of sample {s.id}", self.latent_path(s)))
            if s.image_key:
                files.append((f"SigLIP entry of sample {s.id}", self.image_path(s)))
        if self.validation_image:
            for k in ("latent_key", "image_key"):
                files.append(
                    (
                        f"validation image {k.split('_')[0]} entry",
                        entry_path(self.validation_root, self.validation_image[k]),
                    )
                )
        return files

    def validation_image_condition(self):
        """(cond_latent (1, 32, 1, h, w), image_embeds (1, N, Dv)) for i2v validation."""
        if not self.validation_image:
            raise CacheError(f"{self.path}: no validation image condition (a t2v cache?): run `hvtune cache`")
        cond = read_entry(self.validation_root, self.validation_image["latent_key"])["cond_latents"]
        embeds = read_entry(self.validation_root, self.validation_image["image_key"])["image_embeds"]
        return cond.float()[None], embeds.float()[None]


def manifest_path(resolved: ResolvedConfig) -> Path:
    return cache_dir(resolved) / "manifest.json"


def _rerun_hint(resolved: ResolvedConfig) -> str:
    where = f" --config {resolved.config_path}" if resolved.config_path else ""
    return f"run `hvtune cache{where}` to build it"


def _parse_manifest(resolved: ResolvedConfig, path: Path, data: dict[str, Any]) -> Manifest:
    samples = [ManifestSample.from_json(s) for s in data["samples"]]
    return Manifest(
        path=path,
        task=data["task"],
        fingerprint=data["fingerprint"],
        samples_hash=data["samples_hash"],
        samples=samples,
        text_root=text_root(resolved),
        vae_roots={d: vae_root(resolved, d) for d in {s.dataset for s in samples}},
        validation_root=validation_root(resolved),
        validation_prompt_key=data["validation_prompt_key"],
        validation_negative_key=data["validation_negative_key"],
        empty_prompt_key=data["empty_prompt_key"],
        validation_image=data.get("validation_image"),
        data=data,
    )


def _current_identities(resolved: ResolvedConfig) -> dict[str, dict[str, Any]]:
    """Identities of the encoders the config points at, where they are on this machine (no download); others are
    left out (a training machine need not hold the encoders)."""
    from .registry import ModelSourceError, resolve_model

    names = [*TEXT_COMPONENTS, "vae", *(VISION_COMPONENTS if resolved.task == "i2v" else ())]
    out: dict[str, dict[str, Any]] = {}
    for group in (TEXT_COMPONENTS, ("vae",), VISION_COMPONENTS):
        wanted = [n for n in group if n in names]
        if not wanted:
            continue
        try:
            paths = resolve_model(resolved.train, wanted, allow_download=False)
        except (ModelSourceError, OSError, ValueError):
            continue
        out.update(identities(paths, wanted))
    return out


def load_manifest(resolved: ResolvedConfig, *, check_encoders: bool = True) -> Manifest:
    """The cache for training: reads only the cache. Raises CacheError (naming what is wrong and saying to run
    `hvtune cache`) when the manifest is missing, was built with other settings or encoders, or an entry is missing."""
    path = manifest_path(resolved)
    if not path.is_file():
        raise CacheError(f"no cache at {cache_dir(resolved)} ({path.name} is missing): {_rerun_hint(resolved)}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CacheError(f"{path} is unreadable ({e}): {_rerun_hint(resolved)}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CacheError(f"{path} was written by another cache format (want {FORMAT}): {_rerun_hint(resolved)}")
    problems = _diff(data.get("settings"), cache_settings(resolved))
    if check_encoders:
        built = data.get("encoders", {})
        for name, ident in _current_identities(resolved).items():
            if name in built and built[name] != ident:
                problems.append(f"encoder {name}: the cache was built with other weights or files ({built[name]})")
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise CacheError(
            f"the cache at {cache_dir(resolved)} was built with other settings:\n{listed}\n"
            f"{_rerun_hint(resolved)} again (only what changed is encoded)"
        )
    manifest = _parse_manifest(resolved, path, data)
    for what, entry in manifest.entry_files():
        if not entry.is_file():
            raise CacheError(f"cache entry missing: {what} ({entry}): {_rerun_hint(resolved)} again")
    return manifest


# ------------------------------------------------------------------------------------------------------------ summary


@dataclass
class CacheSummary:
    found: dict[str, int]
    used: dict[str, int]
    skipped: dict[str, int]  # reason -> count
    converted: dict[str, int]  # reason -> count of used samples that needed a conversion
    buckets: dict[tuple[int, int, int], int]  # bucket -> samples (before repeats)
    bucket_draws: dict[tuple[int, int, int], int]  # bucket -> samples per epoch (after repeats)
    hits: dict[str, int]
    misses: dict[str, int]
    bytes_written: int
    seconds: float
    report_path: Path
    manifest_path: Path
    batch_size: int = 1

    @property
    def total_found(self) -> int:
        return sum(self.found.values())

    @property
    def total_used(self) -> int:
        return sum(self.used.values())

    def format(self) -> str:
        lines = [
            f"cache: {self.total_found} file(s) found, {self.total_used} used, {sum(self.skipped.values())} skipped"
        ]
        for ds in self.found:
            lines.append(f"  {ds}: {self.found[ds]} found, {self.used.get(ds, 0)} used")
        if self.skipped:
            lines.append("skipped by reason:")
            lines += [f"  {reason:<24} {n}" for reason, n in sorted(self.skipped.items())]
        if self.converted:
            lines.append("used after a conversion:")
            lines += [f"  {reason:<24} {n}" for reason, n in sorted(self.converted.items())]
        lines.append(f"  {'bucket WxH@F':<16} {'samples':>8} {'per epoch':>10} {f'batches of {self.batch_size}':>12}")
        for (w, h, f), n in sorted(self.buckets.items()):
            draws = self.bucket_draws[(w, h, f)]
            lines.append(f"  {f'{w}x{h}@{f}':<16} {n:>8} {draws:>10} {draws // self.batch_size:>12}")
        lines.append("  (per epoch: with repeats; a bucket's incomplete last batch is dropped)")
        lines.append("cache hits / misses:")
        for name in self.hits:
            lines.append(f"  {name:<10} {self.hits[name]:>6} hit  {self.misses[name]:>6} encoded")
        lines.append(f"written: {self.bytes_written / 1e6:.2f} MB in {self.seconds:.1f} s")
        lines.append(f"report: {self.report_path}")
        lines.append(f"manifest: {self.manifest_path}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------- encoders


GPU_DRIVER_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")  # NVIDIA, AMD ROCm, WSL2: torch needs one of them


def encoder_dtype_name(resolved: ResolvedConfig) -> str:
    """The encoders' dtype, part of every cache key: bfloat16 on a GPU with mixed_precision bf16, else float32.
    Decided without importing torch when no GPU driver node exists (torch could find no GPU either): on a fully cached
    rerun the torch import would be most of the run (2.5 of 3 s on a 2-core CPU)."""
    if resolved.train.mixed_precision != "bf16" or not any(os.path.exists(p) for p in GPU_DRIVER_NODES):
        return "float32"
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def _device_and_dtype(dtype_name: str):
    """Where and in what dtype to encode; imports torch, so only called when something has to be encoded."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu"), getattr(torch, dtype_name)


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def encode_caption(encoders: dict, caption: str, device) -> dict[str, Any]:
    """Valid tokens only of the pipeline's two prompt encodings, for one caption."""
    import torch
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import HunyuanVideo15Pipeline as P

    with torch.inference_mode():
        embeds, mask = P._get_mllm_prompt_embeds(
            text_encoder=encoders["text_encoder"],
            tokenizer=encoders["tokenizer"],
            prompt=[caption],
            device=device,
            tokenizer_max_length=TEXT_MAX_LENGTH,
            system_message=system_message(),
            crop_start=TEXT_CROP_START,
        )
        embeds_2, mask_2 = P._get_byt5_prompt_embeds(
            tokenizer=encoders["tokenizer_2"],
            text_encoder=encoders["text_encoder_2"],
            prompt=[caption],
            device=device,
            tokenizer_max_length=TEXT_2_MAX_LENGTH,
        )
    return {
        "prompt_embeds": embeds[0][mask[0].bool()].clone(),
        "prompt_embeds_2": embeds_2[0][mask_2[0].bool()].clone(),
    }


_PATCH_CONV_CLASS = None


def _patch_conv_class():
    global _PATCH_CONV_CLASS
    if _PATCH_CONV_CLASS is None:
        from torch import nn

        class PatchConv3d(nn.Conv3d):
            """Conv3d (time stride 1, no time padding) that runs on overlapping time chunks when its input is big."""

            patch_bytes = PATCH_CONV_BYTES

            def forward(self, x):
                import torch

                k = self.kernel_size[0]
                frames = x.shape[2]
                size = x.numel() * x.element_size()
                if frames <= k or size <= self.patch_bytes:
                    return super().forward(x)
                out_frames = frames - k + 1
                parts = min(out_frames, math.ceil(size / self.patch_bytes))
                step = math.ceil(out_frames / parts)
                outs = [
                    super(PatchConv3d, self).forward(x[:, :, a : a + step + k - 1]) for a in range(0, out_frames, step)
                ]
                return torch.cat(outs, dim=2)

        _PATCH_CONV_CLASS = PatchConv3d
    return _PATCH_CONV_CLASS


def enable_patch_conv(vae, patch_bytes: int = PATCH_CONV_BYTES) -> int:
    """Make every causal Conv3d of a diffusers HunyuanVideo 1.5 VAE run on time chunks above `patch_bytes` of input.
    Returns how many convolutions were patched."""
    from diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15 import HunyuanVideo15CausalConv3d

    cls = _patch_conv_class()
    patched = 0
    for module in vae.modules():
        if isinstance(module, HunyuanVideo15CausalConv3d):
            conv = module.conv
            if conv.stride[0] == 1 and conv.dilation[0] == 1 and conv.padding[0] == 0:
                conv.__class__ = cls
                conv.patch_bytes = patch_bytes
                patched += 1
    return patched


def load_vae_for_cache(resolved: ResolvedConfig, paths, device, dtype):
    from .registry import load_vae

    vae = load_vae(paths, dtype=dtype).to(device)
    t = resolved.train
    if t.vae_enable_tiling:
        vae.enable_tiling()
    if t.vae_enable_slicing:
        vae.enable_slicing()
    if t.vae_enable_patch_conv:
        enable_patch_conv(vae)
    return vae


def _image_processor():
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    # the i2v pipeline's own processor settings
    return HunyuanVideo15ImageProcessor(vae_scale_factor=16, do_resize=False, do_convert_rgb=True)


def encode_video_latents(vae, frames_uint8, device, dtype):
    """(F, 3, H, W) uint8 -> (32, F', H', W') = VAE mode * scaling_factor of pixels in [-1, 1]."""
    import torch
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5_image2video import retrieve_latents

    from .media import to_model_pixels

    with torch.inference_mode():
        x = to_model_pixels(frames_uint8)[None].to(device, dtype)
        latents = retrieve_latents(vae.encode(x), sample_mode="argmax") * vae.config.scaling_factor
    return latents[0]


def encode_cond_latents(vae, image, device):
    """The i2v pipeline's `_get_image_latents` on a PIL image already at the bucket size -> (32, 1, h, w)."""
    import torch
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5_image2video import (
        HunyuanVideo15ImageToVideoPipeline as I2V,
    )

    with torch.inference_mode():
        out = I2V._get_image_latents(vae, _image_processor(), image, image.height, image.width, device)
    return out[0]


def encode_image_embeds(vision: dict, image, device):
    """The i2v pipeline's `_get_image_embeds` (SigLIP last_hidden_state) -> (N, Dv)."""
    import torch
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5_image2video import (
        HunyuanVideo15ImageToVideoPipeline as I2V,
    )

    with torch.inference_mode():
        out = I2V._get_image_embeds(vision["image_encoder"], vision["feature_extractor"], image, device)
    return out[0]


def _pil(frame_uint8):
    from PIL import Image

    return Image.fromarray(frame_uint8.permute(1, 2, 0).contiguous().numpy())


def decode_sample(sample: Sample, seed: int):
    """uint8 (F, 3, H, W) at the bucket size."""
    from .media import read_image, read_video

    if sample.kind == "image":
        return read_image(sample.source, size=sample.size)
    return read_video(
        sample.source,
        num_frames=sample.frames,
        size=sample.size,
        frame_rate=sample.frame_rate,
        seed=seed,
        key=sample.sha256,
        info=sample.info,
    )


# -------------------------------------------------------------------------------------------------------------- build


@dataclass
class _Plan:
    sample: Sample
    text_keys: list[str]
    latent_key: str
    image_key: str | None


@dataclass
class _Validation:
    source: Any  # PIL, as read
    size: tuple[int, int]
    label: str
    latent_key: str
    image_key: str

    @property
    def image(self):
        """At the validation size, resized and centre-cropped by the pipeline's own image processor."""
        width, height = self.size
        return _image_processor().resize(self.source, height=height, width=width, resize_mode="crop")


class _Stats:
    def __init__(self, names: list[str]):
        self.hits = dict.fromkeys(names, 0)
        self.misses = dict.fromkeys(names, 0)
        self.bytes = 0


def _lock(root: Path):
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    f = open(root / ".lock", "a+")  # noqa: SIM115 - held for the whole build
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        raise CacheError(f"another `hvtune cache` is writing {root}; wait for it to finish") from e
    return f


def _write_report(path: Path, issues: list[Issue]) -> int:
    lines = "".join(json.dumps(i.to_json(), ensure_ascii=False) + "\n" for i in issues)
    return write_text_atomic(path, lines)


def _empty_error(result: ScanResult, report: Path) -> CacheError:
    parts = []
    for ds in result.empty_datasets():
        reasons = Counter(i.reason for i in result.skipped if i.dataset == ds)
        why = ", ".join(f"{r} x{n}" for r, n in reasons.most_common()) or "no video or image files"
        parts.append(f"{ds} ({result.found.get(ds, 0)} file(s) found; skipped: {why})")
    return CacheError(f"dataset(s) with nothing usable: {'; '.join(parts)}. Every skipped file and why: {report}")


def _validation_source(resolved: ResolvedConfig, samples: list[Sample]):
    """(PIL image, sha256 of its source, label): validation_image, else the first frame of the first usable sample."""
    from .datasets import file_sha256
    from .media import MediaError, first_frame

    image_path = resolved.train.validation_image
    if image_path:
        p = Path(image_path).expanduser()
        try:
            return first_frame(p), file_sha256(p), str(p)
        except (MediaError, OSError) as e:
            raise CacheError(f"validation_image {image_path}: {e}") from e
    for s in samples:
        try:
            return first_frame(s.source), s.sha256, f"first frame of {s.id}"
        except MediaError:
            continue
    raise CacheError("no validation image: set validation_image, or add a usable sample")


def build_cache(resolved: ResolvedConfig, *, report_path: Path | None = None, progress: bool = True) -> CacheSummary:
    """Scan the datasets, encode whatever the caches lack, write indexes, the report and the manifest."""
    from tqdm import tqdm

    from .registry import resolve_model

    started = time.time()
    root = cache_dir(resolved)
    lock = _lock(root)
    try:
        t = resolved.train
        i2v = resolved.task == "i2v"
        report = Path(report_path) if report_path else root / "cache_report.jsonl"
        names = [*TEXT_COMPONENTS, "vae", *(VISION_COMPONENTS if i2v else ())]
        paths = resolve_model(t, names)
        ids = identities(paths, names)
        dtype_name = encoder_dtype_name(resolved)
        text_id = {n: ids[n] for n in TEXT_COMPONENTS}
        vae_id = ids["vae"]
        vision_id = {n: ids[n] for n in VISION_COMPONENTS} if i2v else None
        tparams = text_params(dtype_name)
        vopts = vae_options(resolved, dtype_name)

        # 1. scan
        probe = ProbeIndex(root / "probe_index.json")
        result = scan(resolved, probe_index=probe, progress=progress)
        probe.save()
        stats = _Stats(["text", "latent", *(["siglip"] if i2v else [])])
        stats.bytes += _write_report(report, result.issues)
        if result.empty_datasets():
            raise _empty_error(result, report)

        # 2. keys
        def tkey(caption: str) -> str:
            return text_key(caption, text_id, tparams)

        plans = []
        for s in result.samples:
            pixels = sample_params(s)
            plans.append(
                _Plan(
                    s,
                    [tkey(c) for c in s.captions],
                    latent_key(pixels, vae_id, vopts, i2v),
                    siglip_key(pixels, vision_id, dtype_name) if i2v else None,
                )
            )
        prompts = {
            "validation prompt": t.validation_prompt,
            "validation negative prompt": t.validation_negative_prompt,
            "empty caption": "",
        }
        validation: _Validation | None = None
        if i2v:
            image, sha, label = _validation_source(resolved, result.samples)
            width, height = t.validation_size
            vpixels = {"source_sha256": sha, "size": [width, height], "pixels": "diffusers resize crop"}
            validation = _Validation(
                image,
                (width, height),
                label,
                make_key("validation_latent", pixels=vpixels, vae=vae_id, options=vopts),
                siglip_key(vpixels, vision_id, dtype_name),
            )

        troot = text_root(resolved)
        vroot = validation_root(resolved)
        roots = {troot, vroot, *(vae_root(resolved, p.sample.dataset) for p in plans)}
        for r in roots:
            _clean_temp(r)
        indexes = {r: RootIndex(r) for r in roots}

        # 3. text encoders
        captions: dict[str, str] = {}
        for caption in prompts.values():
            captions.setdefault(tkey(caption), caption)
        for p in plans:
            for k, c in zip(p.text_keys, p.sample.captions, strict=True):
                captions.setdefault(k, c)
        text_misses = [k for k in captions if not entry_path(troot, k).is_file()]
        stats.hits["text"] = len(captions) - len(text_misses)
        stats.misses["text"] = len(text_misses)
        written: dict[Path, dict[str, tuple[int, str]]] = {r: {} for r in roots}

        def store(root: Path, key: str, tensors: dict[str, Any], meta: dict[str, str]) -> None:
            nbytes, sha = write_entry(root, key, tensors, meta)
            written[root][key] = (nbytes, sha)
            stats.bytes += nbytes

        if text_misses:
            from .registry import load_text_encoders

            device, dtype = _device_and_dtype(dtype_name)
            encoders = load_text_encoders(paths, dtype=dtype)
            for name in ("text_encoder", "text_encoder_2"):
                encoders[name].to(device)
            for k in tqdm(text_misses, desc="text", unit="caption", disable=not progress, dynamic_ncols=True):
                tensors = encode_caption(encoders, captions[k], device)
                store(troot, k, tensors, {"kind": "text"})
            del encoders
            _free()

        # 4. VAE (latents, i2v condition latents), decoding one sample ahead
        vae_jobs, stats.hits["latent"] = _missing(resolved, plans, "latent_key")
        siglip_jobs, siglip_hits = _missing(resolved, plans, "image_key") if i2v else ([], 0)
        stats.misses["latent"] = len(vae_jobs)
        val_latent_miss = validation is not None and not entry_path(vroot, validation.latent_key).is_file()
        val_image_miss = validation is not None and not entry_path(vroot, validation.image_key).is_file()
        failed: dict[int, Issue] = {}  # id(sample) -> issue
        pending = root / ".pending_siglip"  # first frames the SigLIP stage needs, kept from the VAE stage's decode
        siglip_keys = {p.image_key for p in siglip_jobs}
        if vae_jobs or val_latent_miss:
            device, dtype = _device_and_dtype(dtype_name)
            vae = load_vae_for_cache(resolved, paths, device, dtype)
            for p, frames in tqdm(
                _decoded(vae_jobs, t.seed, failed),
                total=len(vae_jobs),
                desc="vae",
                unit="clip",
                disable=not progress,
                dynamic_ncols=True,
            ):
                vroot_p = vae_root(resolved, p.sample.dataset)
                tensors = {"latents": encode_video_latents(vae, frames, device, dtype)}
                if i2v:
                    first = _pil(frames[0])
                    tensors["cond_latents"] = encode_cond_latents(vae, first, device)
                    if p.image_key in siglip_keys:
                        _save_pending(pending, p.image_key, first)
                meta = {"kind": "latent", "source": p.sample.id, "bucket": "x".join(map(str, p.sample.bucket))}
                store(vroot_p, p.latent_key, tensors, meta)
                del frames, tensors
            if val_latent_miss:
                cond = encode_cond_latents(vae, validation.image, device)
                store(vroot, validation.latent_key, {"cond_latents": cond}, {"kind": "validation"})
            del vae
            _free()

        # 5. SigLIP (i2v)
        if i2v:
            siglip_jobs = [p for p in siglip_jobs if id(p.sample) not in failed]
            stats.hits["siglip"] = siglip_hits
            stats.misses["siglip"] = len(siglip_jobs)
            if siglip_jobs or val_image_miss:
                from .registry import load_vision_encoder

                device, dtype = _device_and_dtype(dtype_name)
                vision = load_vision_encoder(paths, dtype=dtype)
                vision["image_encoder"].to(device)
                for p in tqdm(siglip_jobs, desc="siglip", unit="clip", disable=not progress, dynamic_ncols=True):
                    image = _load_pending(pending, p.image_key)
                    if image is None:
                        try:
                            image = _pil(decode_sample(p.sample, t.seed)[0])
                        except Exception as e:  # a decode failure skips the sample, never the run
                            failed[id(p.sample)] = _decode_issue(p.sample, e)
                            continue
                    embeds = encode_image_embeds(vision, image, device)
                    vroot_p = vae_root(resolved, p.sample.dataset)
                    store(vroot_p, p.image_key, {"image_embeds": embeds}, {"kind": "siglip"})
                if val_image_miss:
                    embeds = encode_image_embeds(vision, validation.image, device)
                    store(vroot, validation.image_key, {"image_embeds": embeds}, {"kind": "validation"})
                del vision
                _free()
            if pending.is_dir():
                for f in pending.iterdir():
                    f.unlink(missing_ok=True)
                pending.rmdir()

        # 6. drop samples that failed to decode (and their byte-identical twins, which share the entries); report
        by_key = {k: failed[id(p.sample)] for p in plans if id(p.sample) in failed for k in (p.latent_key, p.image_key)}
        for p in plans:
            if id(p.sample) in failed:
                continue
            keys = [p.latent_key, *([p.image_key] if i2v else [])]
            if not all(entry_path(vae_root(resolved, p.sample.dataset), k).is_file() for k in keys):
                twin = next((by_key[k] for k in keys if k in by_key), None)
                reason, detail = (
                    (twin.reason, twin.detail) if twin else ("decode_error", "its cache entry was not written")
                )
                failed[id(p.sample)] = Issue(p.sample.dataset, str(p.sample.source), "skipped", reason, detail)
        if failed:
            result.samples = [s for s in result.samples if id(s) not in failed]
            result.issues += list(failed.values())
            plans = [p for p in plans if id(p.sample) not in failed]
        stats.bytes += _write_report(report, result.issues)
        if result.empty_datasets():
            raise _empty_error(result, report)

        for k, caption in captions.items():
            indexes[troot].add(k, "text", caption, *written[troot].get(k, (None, None)))
        for p in plans:
            vr = vae_root(resolved, p.sample.dataset)
            indexes[vr].add(p.latent_key, "latent", p.sample.id, *written[vr].get(p.latent_key, (None, None)))
            if p.image_key:
                indexes[vr].add(p.image_key, "siglip", p.sample.id, *written[vr].get(p.image_key, (None, None)))
        if validation is not None:
            for k, kind in ((validation.latent_key, "validation_latent"), (validation.image_key, "validation_siglip")):
                indexes[vroot].add(k, kind, validation.label, *written[vroot].get(k, (None, None)))
        for idx in indexes.values():
            stats.bytes += idx.save()

        samples = []
        for i, p in enumerate(plans):
            s = p.sample
            samples.append(
                ManifestSample(
                    i, s.id, s.dataset, s.rel, s.captions[0], list(s.captions), p.text_keys[0], list(p.text_keys),
                    p.latent_key, p.image_key, s.bucket, s.repeats,
                ).to_json()
            )  # fmt: skip
        settings = cache_settings(resolved)
        encoders = {n: ids[n] for n in names}
        fingerprint = hashlib.sha256(_canonical({"settings": settings, "encoders": encoders})).hexdigest()
        manifest = {
            "format": FORMAT,
            "task": resolved.task,
            "flavour": t.model_flavour,
            "settings": settings,
            "fingerprint": fingerprint,
            "encoders": encoders,
            "options": {"text": tparams, "vae": vopts, "pixels": PIXELS},
            "window_seed": t.seed,
            "roots": {
                "text": _rel(troot, root),
                "vae": {d: _rel(vae_root(resolved, d), root) for d in result.datasets},
                "validation": _rel(vroot, root),
            },
            "validation_prompt_key": tkey(t.validation_prompt),
            "validation_negative_key": tkey(t.validation_negative_prompt),
            "empty_prompt_key": tkey(""),
            "validation_image": (
                {"latent_key": validation.latent_key, "image_key": validation.image_key, "source": validation.label}
                if validation
                else None
            ),
            "samples_hash": hashlib.sha256(_canonical(samples)).hexdigest(),
            "samples": samples,
        }
        mpath = manifest_path(resolved)
        stats.bytes += write_text_atomic(mpath, json.dumps(manifest, indent=1, ensure_ascii=False))

        buckets: Counter = Counter()
        draws: Counter = Counter()
        for s in result.samples:
            buckets[s.bucket] += 1
            draws[s.bucket] += s.repeats + 1
        summary = CacheSummary(
            found=dict(result.found),
            used=dict(result.used_by_dataset()),
            skipped=dict(result.skipped_by_reason()),
            converted=dict(Counter(i.reason for i in result.issues if i.action == "used")),
            buckets=dict(buckets),
            bucket_draws=dict(draws),
            hits=stats.hits,
            misses=stats.misses,
            bytes_written=stats.bytes,
            seconds=time.time() - started,
            report_path=report,
            manifest_path=mpath,
            batch_size=t.train_batch_size,
        )
        if progress:
            print(summary.format())
        return summary
    finally:
        lock.close()


def _missing(resolved: ResolvedConfig, plans: list[_Plan], attr: str) -> tuple[list[_Plan], int]:
    """(plans whose entry `attr` is missing, one per distinct entry; number of distinct entries present)."""
    seen: set[tuple[Path, str]] = set()
    jobs, hits = [], 0
    for p in plans:
        where = (vae_root(resolved, p.sample.dataset), getattr(p, attr))
        if where in seen:
            continue
        seen.add(where)
        if entry_path(*where).is_file():
            hits += 1
        else:
            jobs.append(p)
    return jobs, hits


def _rel(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _decode_issue(sample: Sample, e: Exception) -> Issue:
    from .media import MediaError

    if isinstance(e, MediaError):
        return Issue(sample.dataset, str(sample.source), "skipped", e.reason, e.detail)
    return Issue(sample.dataset, str(sample.source), "skipped", "decode_error", f"{type(e).__name__}: {e}")


def _decoded(jobs: list[_Plan], seed: int, failed: dict[int, Issue]):
    """Yield (plan, frames) in order, decoding the next sample on a helper thread while the caller encodes this one.
    Samples that fail to decode are recorded in `failed` and not yielded."""
    from concurrent.futures import ThreadPoolExecutor

    if not jobs:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        future = pool.submit(decode_sample, jobs[0].sample, seed)
        for i, plan in enumerate(jobs):
            try:
                frames = future.result()
            except Exception as e:  # a decode failure skips the sample, never the run
                frames = None
                failed[id(plan.sample)] = _decode_issue(plan.sample, e)
            future = pool.submit(decode_sample, jobs[i + 1].sample, seed) if i + 1 < len(jobs) else None
            if frames is not None:
                yield plan, frames
                del frames


def _save_pending(folder: Path, key: str, image) -> None:
    with atomic_path(folder / f"{key}.png") as tmp:
        image.save(tmp, format="PNG")


def _load_pending(folder: Path, key: str):
    from PIL import Image

    path = folder / f"{key}.png"
    if not path.is_file():
        return None
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


# ------------------------------------------------------------------------------------------------------------- verify


def verify_cache(resolved: ResolvedConfig) -> list[str]:
    """Rehash every entry of every index (and check every entry the manifest needs); one line per problem."""
    from safetensors import safe_open

    problems: list[str] = []
    mpath = manifest_path(resolved)
    roots: set[Path] = {text_root(resolved), validation_root(resolved)}
    roots |= {vae_root(resolved, ds.id) for ds in media_datasets(resolved)}
    if not mpath.is_file():
        problems.append(f"{mpath}: missing ({_rerun_hint(resolved)})")
    else:
        try:
            data = json.loads(mpath.read_text(encoding="utf-8"))
            manifest = _parse_manifest(resolved, mpath, data)
            roots |= set(manifest.vae_roots.values())
            for what, path in manifest.entry_files():
                if not path.is_file():
                    problems.append(f"{path}: missing ({what})")
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{mpath}: unreadable ({e})")
    for r in sorted(roots):
        index = RootIndex(r)
        if not index.path.is_file():
            if r.is_dir() and any(r.iterdir()):
                problems.append(f"{index.path}: missing")
            continue
        for key, entry in sorted(index.entries.items()):
            path = entry_path(r, key)
            if not path.is_file():
                problems.append(f"{path}: missing ({entry.get('kind')} {entry.get('label', '')})")
                continue
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
                problems.append(f"{path}: corrupt (sha256 differs from {index.path.name})")
                continue
            try:
                with safe_open(str(path), framework="pt") as f:
                    if json.loads((f.metadata() or {}).get("hvtune", "{}")).get("key") != key:
                        problems.append(f"{path}: corrupt (its metadata names another key)")
            except Exception as e:  # safetensors raises its own error types
                problems.append(f"{path}: corrupt ({e})")
    return problems


# ---------------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """`python -m hvtune.cache --config PATH [--key=value ...]` (the CLI's `hvtune cache` does the same)."""
    from .config import load_config

    parser = argparse.ArgumentParser(prog="python -m hvtune.cache")
    parser.add_argument("--config", required=True)
    parser.add_argument("--verify", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    try:
        resolved = load_config(args.config, argv=overrides)
        if args.verify:
            problems = verify_cache(resolved)
            for p in problems:
                print(f"  {p}")
            print(f"cache verify: {len(problems)} problem(s)" if problems else "cache verify: every entry intact")
            return 1 if problems else 0
        build_cache(resolved)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
