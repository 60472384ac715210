"""The cache's keys and layout: what names an entry, where it lies, how it is written, and the roots and settings.

`hvtune cache` (cache.py) writes entries through this module; the trainer finds them through the manifest
(manifest.py), which reads its roots and settings from here.

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
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hvtune.config.settings import ResolvedConfig, UserError
from hvtune.data.buckets import dataset_resolution
from hvtune.data.datasets import Sample, media_datasets
from hvtune.files import is_temp_name, write_bytes_atomic, write_text_atomic
from hvtune.model.component_files import TEXT, VISION

FORMAT = "hvtune-cache/1"
PIXELS = "media/1:rgb24,cover,center-crop,bicubic-antialias,no-upscale"  # bump when media's pixel output changes
TEXT_MAX_LENGTH = 1000  # the pipeline's tokenizer_max_length (Qwen tokens after the template prefix)
TEXT_CROP_START = 108  # the pipeline's prompt_template_encode_start_idx
TEXT_HIDDEN_LAYER = -3  # the pipeline reads hidden_states[-(2 + 1)]
TEXT_2_MAX_LENGTH = 256  # the pipeline's tokenizer_2_max_length (ByT5)
PATCH_CONV_BYTES = 1 << 30  # patch conv splits a causal conv's input above this size
TEXT_COMPONENTS, VISION_COMPONENTS = TEXT, VISION  # the encoders whose identities enter the keys
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


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def make_key(kind: str, **parts: Any) -> str:
    """sha256 of the canonical JSON of (format, kind, parts)."""
    return hashlib.sha256(canonical_json({"format": FORMAT, "kind": kind, **parts})).hexdigest()


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


def encoder_components(task: str) -> list[str]:
    """The components a cache of `task` ("t2v" / "i2v") is encoded with."""
    return [*TEXT_COMPONENTS, "vae", *(VISION_COMPONENTS if task == "i2v" else ())]


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


def _header(path: Path) -> tuple[int, int, dict[str, Any]]:
    """(file size, header length, header) of a safetensors file; ValueError when there is no readable header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > size - 8:
            raise ValueError(f"{size} bytes, no readable safetensors header")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("unreadable header")
    return size, length, header


def entry_damage(path: Path) -> str | None:
    """Why the entry at `path` cannot be read, from what is cheap to check on every run (no hashing: that is
    `hvtune cache verify`): it exists, its safetensors header parses, and the file is as long as the header says.
    None when it looks whole. Catches truncated and zeroed files (a full disk, a copy cut short)."""
    try:
        size, length, header = _header(path)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"damaged: {e}"
    if 8 + length + end != size:
        return f"damaged: {size} bytes, its header describes {8 + length + end}"
    return None


def text_cut(path: Path) -> str | None:
    """Which token limit a text entry's caption reached (it was cut there), read from its header; None if none."""
    try:
        header = _header(path)[2]
    except (OSError, ValueError):
        return None
    if header.get("prompt_embeds", {}).get("shape", [0])[0] >= TEXT_MAX_LENGTH:
        return f"the text encoder's limit of {TEXT_MAX_LENGTH} tokens"
    if header.get("prompt_embeds_2", {}).get("shape", [0])[0] >= TEXT_2_MAX_LENGTH:
        return f"the glyph encoder's limit of {TEXT_2_MAX_LENGTH} bytes of quoted text"
    return None


def entry_intact(path: Path) -> bool:
    return entry_damage(path) is None


def read_entry(root: Path, key: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(entry_path(root, key))


def remove_temp_files(root: Path) -> None:
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
        if ds.dataset_type == "text_embeds" and ds.default and not ds.skipped and ds.cache_dir:
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
            "resolution": res.describe(),
            "caption_strategy": ds.caption_strategy,
            "captions": [ds.instance_prompt, ds.prepend_instance_prompt, ds.only_instance_prompt],
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
