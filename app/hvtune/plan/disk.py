"""The disk a cache build will write, predicted by `hvtune plan` before anything is encoded.

Every entry is one safetensors file (cache/store.py `write_entry`): an 8-byte header length, a JSON header (the
entry's info as one metadata string, and each tensor's dtype, shape and offsets, padded with spaces to a multiple of
8) and the tensors' bytes. Their shapes (cache/encoders.py):

- text, one per distinct caption plus the validation prompt, its negative and the empty caption: `prompt_embeds`
  (L, Qwen width) and `prompt_embeds_2` (L2, ByT5 width), valid tokens only. L and L2 are counted with the config's
  own tokenizer when it is on this machine (the pipeline's chat template, less its 108-token prefix; ByT5 reads only
  the quoted text, one token per byte plus the end token), else estimated at 4.5 bytes of caption per Qwen token.
- latent, one per sample: `latents` (32, (F-1)/4+1, H/16, W/16), and for i2v `cond_latents` (32, 1, H/16, W/16).
- siglip (i2v), one per sample: `image_embeds` (729, SigLIP width); and the validation image's condition latent and
  SigLIP entry.
- the files beside them: each root's index.json, manifest.json, probe_index.json (measured per entry or sample;
  cache_report.jsonl lists only skipped or converted files and is left out).

The dtype is the one the cache encodes in on a GPU box (cache/encoders.py `encoder_dtype_name`): bfloat16 with
mixed_precision bf16, else float32. `CacheDims` holds the widths: `FULL_SIZE` the real encoders', and a test gives the
tiny model's to check the prediction against a real build.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hvtune.cache.keys import FORMAT, TEXT_2_MAX_LENGTH, TEXT_CROP_START, TEXT_MAX_LENGTH
from hvtune.cache.layout import CacheLayout
from hvtune.cache.manifest import ManifestSample
from hvtune.cache.store import entry_metadata
from hvtune.config.settings import ResolvedConfig
from hvtune.model.architectures import (
    IMAGE_TOKENS,
    LATENT_CHANNELS,
    TRANSFORMER_CONFIG,
    VAE_SPATIAL,
    latent_shape,
)
from hvtune.plan.dataset import PlannedData, PlannedSample
from hvtune.plan.shapes import CAPTION_TOKENS, StepShape

SAFETENSORS_DTYPES = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4)}
# caption bytes per Qwen token, the estimate without a tokenizer: on bench_seqlen's 10 sample captions (English tags,
# sentences, paragraphs) counted with the real Qwen2.5-VL tokenizer, 4.5 gives +1.7% over all, 15% on the worst one
BYTES_PER_QWEN_TOKEN = 4.5
QWEN_TEMPLATE_TAIL = 5  # tokens after the caption: <|im_end|> \n <|im_start|> assistant \n
PROBE_ENTRY_BYTES = 330  # probe_index.json per file, besides its path (measured: JSON of the stream's metadata)
MANIFEST_FIXED_BYTES = 3000  # manifest.json besides its samples and sources: settings, encoders, keys (measured)
KEY = "0" * 64  # a stand-in entry key: every key is 64 hex digits


@dataclass(frozen=True)
class CacheDims:
    """The widths the cache's entries have."""

    text: int  # Qwen hidden size
    text_2: int  # ByT5 d_model
    image: int  # SigLIP hidden size
    image_tokens: int  # SigLIP tokens per image
    latent_channels: int = LATENT_CHANNELS


FULL_SIZE = CacheDims(
    TRANSFORMER_CONFIG["text_embed_dim"], TRANSFORMER_CONFIG["text_embed_2_dim"],
    TRANSFORMER_CONFIG["image_embed_dim"], IMAGE_TOKENS,
)  # fmt: skip


def gpu_cache_dtype(resolved: ResolvedConfig) -> str:
    """The dtype `hvtune cache` encodes in on a GPU box (`encoder_dtype_name` with a GPU visible)."""
    return "bfloat16" if resolved.train.mixed_precision == "bf16" else "float32"


def entry_bytes(tensors: dict[str, tuple[int, ...]], meta: dict[str, str], dtype: str) -> int:
    """Bytes of the entry file `write_entry` writes for tensors of these shapes: safetensors' 8-byte length, its JSON
    header (tensors in name order; one metadata key holding the entry's info) padded to 8, and the data."""
    code, size = SAFETENSORS_DTYPES[dtype]
    header: dict = {"__metadata__": entry_metadata(KEY, meta)}
    offset = 0
    for name in sorted(tensors):
        end = offset + math.prod(tensors[name]) * size
        header[name] = {"dtype": code, "shape": list(tensors[name]), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return 8 + -(-len(text) // 8) * 8 + offset


def text_entry_bytes(qwen_tokens: int, byt5_tokens: int, dims: CacheDims, dtype: str) -> int:
    tensors = {"prompt_embeds": (qwen_tokens, dims.text), "prompt_embeds_2": (byt5_tokens, dims.text_2)}
    return entry_bytes(tensors, {"kind": "text"}, dtype)


def latent_entry_bytes(sample_id: str, bucket: tuple[int, int, int], i2v: bool, dims: CacheDims, dtype: str) -> int:
    width, height, frames = bucket
    _, f, h, w = latent_shape(frames, height, width)
    tensors = {"latents": (dims.latent_channels, f, h, w)}
    if i2v:
        tensors["cond_latents"] = (dims.latent_channels, 1, h, w)
    meta = {"kind": "latent", "source": sample_id, "bucket": "x".join(map(str, bucket))}
    return entry_bytes(tensors, meta, dtype)


def siglip_entry_bytes(dims: CacheDims, dtype: str, kind: str = "siglip") -> int:
    return entry_bytes({"image_embeds": (dims.image_tokens, dims.image)}, {"kind": kind}, dtype)


def validation_bytes(resolved: ResolvedConfig, dims: CacheDims, dtype: str) -> int:
    """The i2v validation image's condition latent and SigLIP entries (none for t2v)."""
    if resolved.task != "i2v":
        return 0
    width, height = resolved.train.validation_size
    cond = {"cond_latents": (dims.latent_channels, 1, height // VAE_SPATIAL, width // VAE_SPATIAL)}
    return entry_bytes(cond, {"kind": "validation"}, dtype) + siglip_entry_bytes(dims, dtype, "validation")


class CaptionTokens:
    """caption -> (Qwen tokens, ByT5 tokens) of its text entry: counted with the config's tokenizer when it is on this
    machine (nothing is downloaded), else estimated (`exact` says which)."""

    def __init__(self, resolved: ResolvedConfig, *, load_tokenizer: bool = True):
        self.tokenizer = _local_tokenizer(resolved) if load_tokenizer else None
        self.exact = self.tokenizer is not None
        self._system = None

    def __call__(self, caption: str) -> tuple[int, int]:
        glyph = glyph_text(caption)
        byt5 = 0 if glyph is None else min(len(glyph.encode("utf-8")) + 1, TEXT_2_MAX_LENGTH)
        return self.qwen(caption), byt5

    def qwen(self, caption: str) -> int:
        if self.tokenizer is None:
            estimate = math.ceil(len((caption or " ").encode("utf-8")) / BYTES_PER_QWEN_TOKEN) + QWEN_TEMPLATE_TAIL
            return min(estimate, TEXT_MAX_LENGTH)
        from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input

        from hvtune.cache.keys import system_message

        self._system = self._system or system_message()
        ids = self.tokenizer.apply_chat_template(
            format_text_input([caption], self._system)[0], add_generation_prompt=True, tokenize=True,
            truncation=True, max_length=TEXT_MAX_LENGTH + TEXT_CROP_START,
        )  # fmt: skip
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return max(len(ids) - TEXT_CROP_START, 0)


def glyph_text(caption: str) -> str | None:
    """The text ByT5 reads: the pipeline's `extract_glyph_texts` (diffusers 0.42.1), copied so that a plan without a
    tokenizer need not import the pipeline (seconds: torch, transformers); tests/test_plan_data.py checks they agree."""
    found = [a or b for a, b in re.findall(r"\"(.*?)\"|“(.*?)”", caption)]
    found = list(dict.fromkeys(found)) if len(found) > 1 else found
    return ". ".join(f'Text "{text}"' for text in found) + ". " if found else None


def _local_tokenizer(resolved: ResolvedConfig):
    """The config's Qwen tokenizer when it is on this machine in diffusers layout, else None (never downloads)."""
    from hvtune.model.registry import ModelSourceError, resolve_model

    try:
        path = resolve_model(resolved.train, ["tokenizer"], allow_download=False)["tokenizer"]
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (ModelSourceError, OSError, ValueError, KeyError):
        return None


@dataclass
class CachePrediction:
    """Bytes a build from an empty cache writes, by part, and the entries behind them."""

    parts: dict[str, int]  # text / latent / siglip / validation / files -> bytes
    entries: dict[str, int]  # text / latent / siglip -> entry files
    dtype: str
    exact_tokens: bool  # captions counted with the tokenizer, not estimated

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def predict_cache_bytes(
    resolved: ResolvedConfig,
    samples: list[PlannedSample],
    dims: CacheDims,
    dtype: str,
    tokens: Callable[[str], tuple[int, int]],
) -> CachePrediction:
    """What `hvtune cache` writes for `samples` (and the validation prompts) into an empty cache."""
    t, i2v = resolved.train, resolved.task == "i2v"
    captions = dict.fromkeys([t.validation_prompt, t.validation_negative_prompt, ""])
    captions.update(dict.fromkeys(c for s in samples for c in s.captions))
    text = {c: text_entry_bytes(*tokens(c), dims, dtype) for c in captions}
    latent = {s.id: latent_entry_bytes(s.id, s.bucket, i2v, dims, dtype) for s in samples}
    siglip = siglip_entry_bytes(dims, dtype) if i2v else 0
    parts = {
        "text": sum(text.values()),
        "latent": sum(latent.values()),
        "siglip": siglip * len(samples),
        "validation": validation_bytes(resolved, dims, dtype),
    }
    parts["files"] = _files_bytes(resolved, samples, text, latent, siglip)
    entries = {"text": len(text), "latent": len(samples), "siglip": len(samples) if i2v else 0}
    return CachePrediction(parts, entries, dtype, getattr(tokens, "exact", False))


def _files_bytes(
    resolved: ResolvedConfig, samples: list[PlannedSample], text: dict[str, int], latent: dict[str, int], siglip: int
) -> int:
    """index.json of each root, manifest.json and probe_index.json: the same JSON with stand-in keys and hashes."""

    def index(entries: list[tuple[str, int, str]]) -> int:
        rows = {f"{i:064x}": {"kind": k, "bytes": n, "sha256": KEY, "label": label[:200]} for i, (k, n, label) in
                enumerate(entries)}  # fmt: skip
        data = json.dumps({"format": FORMAT, "entries": rows}, sort_keys=True, indent=0, ensure_ascii=False)
        return len(data.encode("utf-8"))

    vae_roots: dict[str, list[tuple[str, int, str]]] = {}
    for s in samples:
        rows = vae_roots.setdefault(s.dataset, [])
        rows.append(("latent", latent[s.id], s.id))
        if siglip:
            rows.append(("siglip", siglip, s.id))
    total = index([("text", n, c) for c, n in text.items()]) + sum(index(rows) for rows in vae_roots.values())
    total += index([("validation_latent", 0, "x")] * (2 if resolved.task == "i2v" else 0))
    manifest_samples = [
        ManifestSample(i, s.id, s.dataset, s.id, s.captions[0], list(s.captions), KEY, [KEY] * len(s.captions), KEY,
                       KEY if siglip else None, s.bucket, 0).to_json()
        for i, s in enumerate(samples)
    ]  # fmt: skip
    sources = {f"{s.dataset}/{s.id}{suffix}": [0, 10**18] for s in samples for suffix in ("", ".txt")}
    manifest = json.dumps({"samples": manifest_samples, "sources": sources}, indent=1, ensure_ascii=False)
    probe = sum(PROBE_ENTRY_BYTES + len(s.id) + len(s.dataset) for s in samples)
    return total + MANIFEST_FIXED_BYTES + len(manifest.encode("utf-8")) + probe


def free_space(path: Path) -> tuple[Path, int]:
    """(the folder asked, or its nearest existing parent; bytes free on its filesystem)."""
    probe = path.expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe, shutil.disk_usage(probe).free


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def disk_lines(resolved: ResolvedConfig, data: PlannedData, shape: StepShape, dims: CacheDims = FULL_SIZE) -> list[str]:
    """What the plan prints about the cache's disk: the total for the clips found (else per clip and per 1,000 clips
    at the planned bucket), and the free space of cache_dir's filesystem."""
    dtype, tokens = gpu_cache_dtype(resolved), CaptionTokens(resolved)
    how = "counted with the config's tokenizer" if tokens.exact else "estimated, no tokenizer on this machine"
    if data.samples:
        pred = predict_cache_bytes(resolved, data.samples, dims, dtype, tokens)
        need = pred.total
        parts = ", ".join(f"{k} {gb(v)}" for k, v in pred.parts.items() if v)
        lines = [f"  cache disk ({dtype}): {gb(need)} for {len(data.samples)} sample(s): {parts}; caption tokens {how}"]
    else:
        typical = PlannedSample("dataset/clip.mp4", "dataset", "video", (shape.width, shape.height, shape.frames),
                                ("caption",))  # fmt: skip
        fixed = predict_cache_bytes(resolved, [], dims, dtype, tokens).total

        def assumed(caption: str) -> tuple[int, int]:  # the typical clip's caption is CAPTION_TOKENS long
            return (CAPTION_TOKENS, 0) if caption == "caption" else tokens(caption)

        one = predict_cache_bytes(resolved, [typical], dims, dtype, assumed).total - fixed
        need = fixed + 1000 * one
        lines = [
            f"  cache disk ({dtype}): {gb(one)} per clip at {shape.width}x{shape.height}x{shape.frames}f with one "
            f"caption of {CAPTION_TOKENS} tokens; {gb(need)} per 1,000 clips"
        ]
    root = CacheLayout(resolved).root.expanduser().absolute()
    probe, free = free_space(root)
    where = f"cache_dir {root}" if probe == root else f"{probe} (cache_dir {root} is not made yet)"
    what = "the cache" if data.samples else "1,000 clips"
    verdict = f"{what} fits" if free >= need else f"{what} DOES NOT FIT: {gb(need - free)} short"
    lines.append(f"    {where}: {gb(free)} free: {verdict}")
    return lines
