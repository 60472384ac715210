"""The manifest: what training reads of the cache, and the check that the cache still fits the config.

`<cache_dir>/manifest.json` (written last by `build_cache`, build.py) lists every sample - its captions, bucket,
repeats and the keys of its text, latent and SigLIP entries - with the settings and encoder identities the cache was
built with. `load_manifest` is all the trainer needs to read a cache: it reads only the cache (no clips, no encoders
needed on a training machine), compares the recorded settings with the config's (`CacheLayout.settings`) and the
recorded encoders with the ones the config points at where they are on this machine, checks that every entry it names
exists, and otherwise raises a `CacheError` that names what differs and says to run `hvtune cache`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvtune.cache.keys import FORMAT, TEXT_COMPONENTS, VISION_COMPONENTS, encoder_components, identities
from hvtune.cache.layout import CacheLayout
from hvtune.cache.store import CacheError, entry_damage, entry_path, read_entry
from hvtune.config.settings import ResolvedConfig


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
    repair_hint: str = "run `hvtune cache` again"  # the command that re-encodes a damaged entry
    verify_command: str = "hvtune cache verify"  # the command that rehashes every entry

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
        latent, image = (
            entry_path(self.validation_root, self.validation_image[k]) for k in ("latent_key", "image_key")
        )
        cond = read_entry(latent, self.repair_hint)["cond_latents"]
        embeds = read_entry(image, self.repair_hint)["image_embeds"]
        return cond.float()[None], embeds.float()[None]


def parse_manifest(layout: CacheLayout, data: dict[str, Any]) -> Manifest:
    """The manifest `data` read from `layout.manifest_path`, with the roots of its entries."""
    samples = [ManifestSample.from_json(s) for s in data["samples"]]
    return Manifest(
        path=layout.manifest_path,
        task=data["task"],
        fingerprint=data["fingerprint"],
        samples_hash=data["samples_hash"],
        samples=samples,
        text_root=layout.text_root,
        vae_roots={d: layout.vae_root(d) for d in {s.dataset for s in samples}},
        validation_root=layout.validation_root,
        validation_prompt_key=data["validation_prompt_key"],
        validation_negative_key=data["validation_negative_key"],
        empty_prompt_key=data["empty_prompt_key"],
        validation_image=data.get("validation_image"),
        data=data,
        repair_hint=layout.repair_hint,
        verify_command=layout.verify_command,
    )


def _current_identities(resolved: ResolvedConfig) -> dict[str, dict[str, Any]]:
    """Identities of the encoders the config points at, where they are on this machine (no download); others are
    left out (a training machine need not hold the encoders)."""
    from hvtune.model.registry import ModelSourceError, resolve_model

    names = encoder_components(resolved.task)
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


def source_stats(paths: Iterable[Path]) -> dict[str, list[int]]:
    """path -> [size, mtime_ns] of every file a cache was built from (clips, caption files, caption tables): what
    `changed_sources` compares, so that training notices an edited caption or a replaced clip without hashing."""
    out: dict[str, list[int]] = {}
    for path in paths:
        try:
            st = Path(path).stat()
        except OSError:
            continue
        out[str(path)] = [st.st_size, st.st_mtime_ns]
    return out


def changed_sources(data: dict[str, Any], resolved: ResolvedConfig | None = None) -> list[str]:
    """What changed in the datasets since the cache was built, one "PATH: edited or replaced / deleted / added"
    each: a recorded clip, caption file or caption table whose size or modification time differ, one that is gone
    while its dataset's clips are here, and a file in a dataset's folder the build never looked at. Nothing is
    deleted where none of a dataset's clips is on this machine: a training (or planning) machine need not hold them."""
    recorded = (data.get("dataset_files") or {}).values()
    present = [Path(f["root"]) for f in recorded if any((Path(f["root"]) / rel).exists() for rel in f["files"])]
    changed = []
    for path, recorded in (data.get("sources") or {}).items():
        now = source_stats([Path(path)]).get(path)
        if now is None and any(Path(path).is_relative_to(r) for r in present):
            changed.append(f"{path}: deleted since the cache was built")
        elif now is not None and now != recorded:
            changed.append(f"{path}: edited or replaced since the cache was built")
    return changed + (_added_files(data, resolved) if resolved is not None else [])


def _added_files(data: dict[str, Any], resolved: ResolvedConfig) -> list[str]:
    """Files in a dataset's folder that the build did not look at (no sample, no skip): added since."""
    from hvtune.data.datasets import candidate_files, media_datasets

    added = []
    for ds in media_datasets(resolved):
        recorded = (data.get("dataset_files") or {}).get(ds.id)
        root = Path(ds.instance_data_dir or "").expanduser()
        if recorded is None or not root.is_dir():
            continue
        known = set(recorded["files"])
        added += [
            f"{path}: added since the cache was built"
            for path, rel in candidate_files(ds, root, [])
            if rel not in known
        ]
    return added


def _source_changes_refused(resolved: ResolvedConfig, layout: CacheLayout, changes: list[str]) -> None:
    """The datasets changed since the cache was built: refused in one line naming the files and the command that
    updates the cache, or, with train_on_cache_as_is, announced and trained on as cached."""
    shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
    if resolved.train.train_on_cache_as_is:
        if os.environ.get("RANK", "0") == "0":
            print(
                f"notice: train_on_cache_as_is: training on the cache as it was built; not seen: {shown}",
                file=sys.stderr,
            )
        return
    raise CacheError(
        f"the datasets changed: {shown}. Run `{layout.command}` to update the cache (only what changed is encoded), "
        "or set train_on_cache_as_is: true to train on the cache as it is"
    )


def load_manifest(resolved: ResolvedConfig, *, check_encoders: bool = True) -> Manifest:
    """The cache for training: reads only the cache. Raises CacheError (naming what is wrong and saying to run
    `hvtune cache`) when the manifest is missing, was built with other settings or encoders, or an entry is missing."""
    layout = CacheLayout(resolved)
    path = layout.manifest_path
    if not path.is_file():
        raise CacheError(f"no cache at {layout.root} ({path.name} is missing): {layout.rerun_hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CacheError(f"{path} is unreadable ({e}): {layout.rerun_hint}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CacheError(f"{path} was written by another cache format (want {FORMAT}): {layout.rerun_hint}")
    problems = _diff(data.get("settings"), layout.settings)
    if check_encoders:
        built = data.get("encoders", {})
        for name, ident in _current_identities(resolved).items():
            if name in built and built[name] != ident:
                problems.append(f"encoder {name}: the cache was built with other weights or files ({built[name]})")
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise CacheError(
            f"the cache at {layout.root} was built with other settings:\n{listed}\n"
            f"{layout.rerun_hint} again (only what changed is encoded)"
        )
    changes = changed_sources(data, resolved)
    if changes:
        _source_changes_refused(resolved, layout, changes)
    manifest = parse_manifest(layout, data)
    for what, entry in manifest.entry_files():
        damage = entry_damage(entry)  # size and header only: cheap enough for every run
        if damage:
            raise CacheError(f"cache entry {damage}: {what} ({entry}): {manifest.repair_hint}")
    return manifest
