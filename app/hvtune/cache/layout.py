"""Where a cache lies and what it must match, computed once from the config: its roots, its files and its settings.

Roots: text entries in the default `text_embeds` dataset's `cache_dir` (else `<cache_dir>/text`); latents and SigLIP
entries in each dataset's `cache_dir_vae` (else `<cache_dir>/vae/<id>`); validation conditions in
`<cache_dir>/validation`. `<cache_dir>/manifest.json` lists the samples and settings for the trainer,
`<cache_dir>/cache_report.jsonl` every skipped sample (and every converted one) with its reason. A build
(build.py), the manifest (manifest.py) and `verify_cache` (verify.py) all read them from one `CacheLayout`.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from hvtune.cache.keys import FORMAT
from hvtune.config.settings import ResolvedConfig
from hvtune.data.buckets import dataset_bucket_rule
from hvtune.data.datasets import media_datasets


class CacheLayout:
    """The roots, files, settings and rebuild command of the cache a config points at."""

    def __init__(self, resolved: ResolvedConfig):
        self.resolved = resolved
        self.root = Path(resolved.train.cache_dir).expanduser()
        self.text_root = _text_root(resolved, self.root)
        self.validation_root = self.root / "validation"
        self.manifest_path = self.root / "manifest.json"
        self.report_path = self.root / "cache_report.jsonl"
        self.probe_index_path = self.root / "probe_index.json"
        self._vae_dirs: dict[str, Path] = {}  # dataset id -> the cache_dir_vae the config sets for it
        for ds in resolved.datasets:
            if ds.cache_dir_vae:
                self._vae_dirs.setdefault(ds.id, Path(ds.cache_dir_vae).expanduser())

    def vae_root(self, dataset_id: str) -> Path:
        """Where a dataset's latent and SigLIP entries lie."""
        return self._vae_dirs.get(dataset_id, self.root / "vae" / dataset_id)

    @cached_property
    def settings(self) -> dict[str, Any]:
        """`cache_settings` of the config: computed when first asked for (a build asks only at its end)."""
        return cache_settings(self.resolved)

    @property
    def command(self) -> str:
        """The command that builds this cache."""
        path = self.resolved.config_path
        return f"hvtune cache --config {path}" if path else "hvtune cache"

    @property
    def verify_command(self) -> str:
        """The command that rehashes every entry of this cache."""
        path = self.resolved.config_path
        return f"hvtune cache verify --config {path}" if path else "hvtune cache verify"

    @property
    def rerun_hint(self) -> str:
        return f"run `{self.command}` to build it"

    @property
    def repair_hint(self) -> str:
        return f"run `{self.command}` (it encodes every damaged, missing or outdated entry again)"


def _text_root(resolved: ResolvedConfig, cache_root: Path) -> Path:
    for ds in resolved.datasets:
        if ds.dataset_type == "text_embeds" and ds.default and not ds.skipped and ds.cache_dir:
            return Path(ds.cache_dir).expanduser()
    return cache_root / "text"


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
        res = dataset_bucket_rule(ds, resolved)
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
