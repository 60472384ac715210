"""What one build will hold, decided before anything is encoded: the state its stages share (`Build`), the keys of
every sample's entries (`EntryPlan`) and of the i2v validation image's (`ValidationPlan`), the captions to encode, and
which entries are missing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvtune.cache.encoders import encoder_dtype_name, image_processor, vae_encode_dtype_name
from hvtune.cache.keys import (
    TEXT_COMPONENTS,
    VISION_COMPONENTS,
    encoder_components,
    identities,
    latent_key,
    make_key,
    sample_params,
    siglip_key,
    text_key,
    text_params,
    vae_options,
)
from hvtune.cache.layout import CacheLayout
from hvtune.cache.report import BuildCounts
from hvtune.cache.shard import Shard
from hvtune.cache.store import CacheError, RootIndex, entry_intact, entry_path, write_entry
from hvtune.config.settings import ResolvedConfig
from hvtune.data.datasets import Issue, Sample, ScanResult, file_sha256


@dataclass
class EntryPlan:
    """A sample and the keys of its entries."""

    sample: Sample
    text_keys: list[str]
    latent_key: str
    image_key: str | None


@dataclass
class ValidationPlan:
    """The i2v validation image and the keys of its condition entries."""

    source: Any  # PIL, as read
    size: tuple[int, int]
    label: str
    latent_key: str
    image_key: str

    @property
    def image(self):
        """At the validation size, resized and centre-cropped by the pipeline's own image processor."""
        width, height = self.size
        return image_processor().resize(self.source, height=height, width=width, resize_mode="crop")


class Build:
    """One run of `build_cache`: what its stages share - the layout, the encoders and their identities, the key
    options, the roots it writes and their indexes, the counts, the samples that failed to decode, and the
    (bytes, sha256) of every entry it wrote (so the indexes need not rehash them)."""

    def __init__(self, layout: CacheLayout, progress: bool, shard: Shard):
        from hvtune.model.registry import resolve_model

        resolved = layout.resolved
        self.shard = shard  # SHARD HOOK: this process's place among the cache processes
        self.layout = layout
        self.resolved = resolved
        self.progress = progress
        self.i2v = resolved.task == "i2v"
        self.names = encoder_components(resolved.task)
        self.paths = resolve_model(resolved.train, self.names)
        self.ids = identities(self.paths, self.names)
        self.dtype_name = encoder_dtype_name(resolved)
        self.text_id = {n: self.ids[n] for n in TEXT_COMPONENTS}
        self.vae_id = self.ids["vae"]
        self.vision_id = {n: self.ids[n] for n in VISION_COMPONENTS} if self.i2v else None
        self.tparams = text_params(self.dtype_name)
        self.vae_dtype_name = vae_encode_dtype_name(resolved)
        self.vopts = vae_options(resolved, self.vae_dtype_name)
        self.stats = BuildCounts(["text", "latent", *(["siglip"] if self.i2v else [])])
        self.indexes: dict[Path, RootIndex] = {}
        self.written: dict[Path, dict[str, tuple[int, str]]] = {}
        self.failed: dict[int, Issue] = {}  # id(sample) -> issue
        self.pending = layout.root / ".pending_siglip"  # first frames the SigLIP stage needs, kept from the VAE stage

    def text_key(self, caption: str) -> str:
        return text_key(caption, self.text_id, self.tparams)

    def vae_root(self, plan: EntryPlan) -> Path:
        return self.layout.vae_root(plan.sample.dataset)

    def store(self, root: Path, key: str, tensors: dict[str, Any], meta: dict[str, str]) -> None:
        nbytes, sha = write_entry(root, key, tensors, meta)
        self.written[root][key] = (nbytes, sha)
        self.stats.bytes += nbytes

    def reusable(self, root: Path, key: str) -> bool:
        """Whether the entry `key` of `root` counts as a hit: whole (size and header) and, where the root's index
        records its sha256, still those bytes. What `hvtune cache verify` rejects (a flipped byte, same size, header
        intact) is a miss, encoded again: the repair verify prints does repair."""
        path = entry_path(root, key)
        if not entry_intact(path):
            return False
        index = self.indexes.get(Path(root))
        recorded = index.entries.get(key, {}).get("sha256") if index is not None else None
        return recorded is None or file_sha256(path) == recorded

    def validation_missing(self, key: str) -> bool:
        """Whether the validation entry `key` must be encoded (absent, damaged or not the bytes its index holds)."""
        return not self.reusable(self.layout.validation_root, key)


def plan_keys(build: Build, result: ScanResult) -> tuple[list[EntryPlan], ValidationPlan | None]:
    """The keys of every sample's entries, and of the i2v validation image's."""
    plans = []
    for s in result.samples:
        pixels = sample_params(s)
        plans.append(
            EntryPlan(
                s,
                [build.text_key(c) for c in s.captions],
                latent_key(pixels, build.vae_id, build.vopts, build.i2v),
                siglip_key(pixels, build.vision_id, build.dtype_name) if build.i2v else None,
            )
        )
    validation: ValidationPlan | None = None
    if build.i2v:
        image, sha, label = _validation_source(build.resolved, result.samples)
        width, height = build.resolved.train.validation_size
        vpixels = {"source_sha256": sha, "size": [width, height], "pixels": "diffusers resize crop"}
        validation = ValidationPlan(
            image,
            (width, height),
            label,
            make_key("validation_latent", pixels=vpixels, vae=build.vae_id, options=build.vopts),
            siglip_key(vpixels, build.vision_id, build.dtype_name),
        )
    return plans, validation


def _validation_source(resolved: ResolvedConfig, samples: list[Sample]):
    """(PIL image, sha256 of its source, label): validation_image, else the first frame of the first usable sample."""
    from hvtune.data.datasets import file_sha256
    from hvtune.data.media import MediaError, first_frame

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


def plan_captions(build: Build, plans: list[EntryPlan]) -> dict[str, str]:
    """text key -> caption, for the validation prompts, the empty caption and every sample's captions."""
    t = build.resolved.train
    captions: dict[str, str] = {}
    for caption in (t.validation_prompt, t.validation_negative_prompt, ""):
        captions.setdefault(build.text_key(caption), caption)
    for p in plans:
        for k, c in zip(p.text_keys, p.sample.captions, strict=True):
            captions.setdefault(k, c)
    return captions


def missing(build: Build, plans: list[EntryPlan], attr: str) -> tuple[list[EntryPlan], int]:
    """(plans whose entry `attr` is missing, one per distinct entry; number of distinct entries present)."""
    seen: set[tuple[Path, str]] = set()
    jobs, hits = [], 0
    for p in plans:
        where = (build.vae_root(p), getattr(p, attr))
        if where in seen:
            continue
        seen.add(where)
        if build.reusable(*where):  # a damaged entry is a miss: encoded again
            hits += 1
        else:
            jobs.append(p)
    return jobs, hits
