"""The cache's keys: what names an entry, computed from everything that decides its bytes.

Every entry's key is the sha256 of a canonical JSON document holding the cache format version, what the entry is, its
input (the caption text, or the sha256 of the source file's bytes), every processing parameter (bucket size, frames,
window start, frame rate, pixel pipeline version, prompt template, token limits, dtype, VAE tiling / slicing /
patch-conv) and the identity of every encoder involved (class, a hash of every file in its folder - small files whole,
weight files by size + first and last MiB - and the hub commit when it came from the hub). Same inputs -> same key on
any machine; any change -> a new key. Keys never contain paths: renaming or moving files changes nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hvtune.config.settings import ResolvedConfig
from hvtune.data.datasets import Sample
from hvtune.flavours import TEXT, VISION

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


def vae_options(resolved: ResolvedConfig, dtype: str) -> dict[str, Any]:
    t = resolved.train
    return {
        "tiling": t.vae_enable_tiling is True,  # unset encodes untiled, as false (the same entries as before)
        "slicing": t.vae_enable_slicing,
        "patch_conv": t.vae_enable_patch_conv,
        "patch_conv_bytes": PATCH_CONV_BYTES if t.vae_enable_patch_conv else None,
        "dtype": dtype,
    }
