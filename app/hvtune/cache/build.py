"""`hvtune cache`: builds the content-addressed caches - text embeddings, VAE latents, i2v conditions, validation
prompts - and the manifest; `verify_cache` rehashes them.

`hvtune cache` runs `build_cache` once so that training never loads the text encoders, the VAE encoder or SigLIP.
A build runs in stages: scan the datasets, plan every entry's key, encode what the text, VAE and SigLIP entries lack,
drop the samples that failed to decode, then write the report, the roots' indexes and the manifest. What a key holds
and where entries lie: cache_store.py; what each entry holds and how it is encoded: encoders.py; what training reads:
manifest.py.

Memory. Encoders are loaded one group at a time - the text encoders, then the VAE, then SigLIP - each only when it
has misses, and freed before the next. Clips are decoded one at a time (one decoded ahead on a helper thread) and
never held, so peak memory does not grow with the dataset.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvtune.cache.encoders import (
    decode_sample,
    device_and_dtype,
    encode_caption,
    encode_cond_latents,
    encode_image_embeds,
    encode_video_latents,
    encoder_dtype_name,
    free_memory,
    image_processor,
    load_vae_for_cache,
    to_pil,
)
from hvtune.cache.manifest import ManifestSample, manifest_path, parse_manifest, repair_hint, rerun_hint, source_stats
from hvtune.cache.shard import Shard
from hvtune.cache.store import (
    FORMAT,
    PIXELS,
    TEXT_COMPONENTS,
    VISION_COMPONENTS,
    CacheError,
    RootIndex,
    cache_dir,
    cache_settings,
    canonical_json,
    encoder_components,
    entry_damage,
    entry_intact,
    entry_path,
    identities,
    latent_key,
    make_key,
    remove_temp_files,
    sample_params,
    siglip_key,
    text_cut,
    text_key,
    text_params,
    text_root,
    vae_options,
    vae_root,
    validation_root,
    write_entry,
)
from hvtune.config.settings import ResolvedConfig, UserError
from hvtune.data.datasets import Issue, ProbeIndex, Sample, ScanResult, media_datasets, scan
from hvtune.files import atomic_path, disk_full_message, is_disk_full, write_text_atomic

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
        return image_processor().resize(self.source, height=height, width=width, resize_mode="crop")


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


def _write_report(build: _Build, result: ScanResult, report: Path) -> None:
    """`cache_report.jsonl`: every skipped or converted sample and why. Raises when a dataset has nothing usable."""
    lines = "".join(json.dumps(i.to_json(), ensure_ascii=False) + "\n" for i in result.issues)
    if build.shard.main:  # SHARD HOOK: one process writes the report
        build.stats.bytes += write_text_atomic(report, lines)
    if result.empty_datasets():
        raise _empty_error(result, report)


def _empty_error(result: ScanResult, report: Path) -> CacheError:
    parts = []
    for ds in result.empty_datasets():
        reasons = Counter(i.reason for i in result.skipped if i.dataset == ds)
        why = ", ".join(f"{r} x{n}" for r, n in reasons.most_common()) or "no video or image files"
        parts.append(f"{ds} ({result.found.get(ds, 0)} file(s) found; skipped: {why})")
    return CacheError(f"dataset(s) with nothing usable: {'; '.join(parts)}. Every skipped file and why: {report}")


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


class _Build:
    """One run of `build_cache`: what its stages share - the encoders and their identities, the key options, the
    roots it writes and their indexes, the counts, the samples that failed to decode, and the (bytes, sha256) of every
    entry it wrote (so the indexes need not rehash them)."""

    def __init__(self, resolved: ResolvedConfig, root: Path, progress: bool, shard: Shard):
        from hvtune.model.registry import resolve_model

        self.shard = shard  # SHARD HOOK: this process's place among the cache processes
        self.resolved = resolved
        self.root = root
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
        self.vopts = vae_options(resolved, self.dtype_name)
        self.text_root = text_root(resolved)
        self.validation_root = validation_root(resolved)
        self.stats = _Stats(["text", "latent", *(["siglip"] if self.i2v else [])])
        self.indexes: dict[Path, RootIndex] = {}
        self.written: dict[Path, dict[str, tuple[int, str]]] = {}
        self.failed: dict[int, Issue] = {}  # id(sample) -> issue
        self.pending = root / ".pending_siglip"  # first frames the SigLIP stage needs, kept from the VAE stage's decode

    def text_key(self, caption: str) -> str:
        return text_key(caption, self.text_id, self.tparams)

    def store(self, root: Path, key: str, tensors: dict[str, Any], meta: dict[str, str]) -> None:
        nbytes, sha = write_entry(root, key, tensors, meta)
        self.written[root][key] = (nbytes, sha)
        self.stats.bytes += nbytes


def build_cache(resolved: ResolvedConfig, *, report_path: Path | None = None, progress: bool = True) -> CacheSummary:
    """Scan the datasets, encode whatever the caches lack, write indexes, the report and the manifest."""
    started = time.time()
    root = cache_dir(resolved)
    shard = Shard.start(root)  # SHARD HOOK
    lock = _lock(root) if shard.main else None  # SHARD HOOK: the main process holds the lock for all
    try:
        build = _Build(resolved, root, progress, shard)
        report = Path(report_path) if report_path else root / "cache_report.jsonl"
        with shard.main_first():  # SHARD HOOK: the others read the main process's probe index
            result = _scan(build, report)
        plans, validation = _plan_keys(build, result)
        _open_roots(build, plans)
        captions = _captions(build, plans)
        shard.sync(build, plans)  # SHARD HOOK: every process sees the same misses
        _encode_text(build, captions)
        shard.sync(build, plans)  # SHARD HOOK
        siglip_jobs, siglip_hits = _missing(resolved, plans, "image_key") if build.i2v else ([], 0)
        _encode_latents(build, plans, validation, {p.image_key for p in siglip_jobs})
        shard.sync(build, plans)  # SHARD HOOK: the VAE phase's decode failures, on every process
        if build.i2v:
            _encode_siglip(build, siglip_jobs, siglip_hits, validation)
        shard.sync(build, plans, final=True)  # SHARD HOOK: all finished; failures, written entries, bytes merged
        if not shard.main:  # SHARD HOOK: one process writes the report, the indexes and the manifest
            return _summary(build, result, report, manifest_path(resolved), started)
        plans = _drop_failed(build, result, plans)
        _report_cut_captions(build, result, plans)
        _write_report(build, result, report)
        _write_indexes(build, captions, plans, validation)
        mpath = _write_manifest(build, result, plans, validation)
        summary = _summary(build, result, report, mpath, started)
        if progress:
            print(summary.format())
        return summary
    except OSError as e:
        if not is_disk_full(e):
            raise
        fix = f"free space there or point cache_dir at a bigger disk, then {rerun_hint(resolved)} (entries already "
        raise CacheError(disk_full_message(root, "the cache", fix + "written are kept)")) from e
    finally:
        if lock is not None:  # SHARD HOOK
            lock.close()


def _scan(build: _Build, report: Path) -> ScanResult:
    """The datasets' samples (probing only files the probe index does not know), and the report."""
    probe = ProbeIndex(build.root / "probe_index.json")
    result = scan(build.resolved, probe_index=probe, progress=build.progress and build.shard.main)  # SHARD HOOK
    if build.shard.main:  # SHARD HOOK: the others read the main process's probe index
        probe.save()
    _write_report(build, result, report)
    return result


def _plan_keys(build: _Build, result: ScanResult) -> tuple[list[_Plan], _Validation | None]:
    """The keys of every sample's entries, and of the i2v validation image's."""
    plans = []
    for s in result.samples:
        pixels = sample_params(s)
        plans.append(
            _Plan(
                s,
                [build.text_key(c) for c in s.captions],
                latent_key(pixels, build.vae_id, build.vopts, build.i2v),
                siglip_key(pixels, build.vision_id, build.dtype_name) if build.i2v else None,
            )
        )
    validation: _Validation | None = None
    if build.i2v:
        image, sha, label = _validation_source(build.resolved, result.samples)
        width, height = build.resolved.train.validation_size
        vpixels = {"source_sha256": sha, "size": [width, height], "pixels": "diffusers resize crop"}
        validation = _Validation(
            image,
            (width, height),
            label,
            make_key("validation_latent", pixels=vpixels, vae=build.vae_id, options=build.vopts),
            siglip_key(vpixels, build.vision_id, build.dtype_name),
        )
    return plans, validation


def _open_roots(build: _Build, plans: list[_Plan]) -> None:
    """Every root this run writes to: the temp files a killed run left removed, its index read."""
    roots = {build.text_root, build.validation_root, *(vae_root(build.resolved, p.sample.dataset) for p in plans)}
    for r in roots:
        if build.shard.main:  # SHARD HOOK: before any process writes (the sync after the plan)
            remove_temp_files(r)
    build.indexes = {r: RootIndex(r) for r in roots}
    build.written = {r: {} for r in roots}


def _captions(build: _Build, plans: list[_Plan]) -> dict[str, str]:
    """text key -> caption, for the validation prompts, the empty caption and every sample's captions."""
    t = build.resolved.train
    captions: dict[str, str] = {}
    for caption in (t.validation_prompt, t.validation_negative_prompt, ""):
        captions.setdefault(build.text_key(caption), caption)
    for p in plans:
        for k, c in zip(p.text_keys, p.sample.captions, strict=True):
            captions.setdefault(k, c)
    return captions


def _encode_text(build: _Build, captions: dict[str, str]) -> None:
    """The text encoders, loaded only when a caption's entry is missing."""
    text_misses = [k for k in captions if not entry_intact(entry_path(build.text_root, k))]
    build.stats.hits["text"] = len(captions) - len(text_misses)
    build.stats.misses["text"] = len(text_misses)
    total, text_misses = len(text_misses), build.shard.share(text_misses, "text", show=build.progress)  # SHARD HOOK
    if not text_misses:
        return
    from hvtune.model.registry import load_text_encoders

    device, dtype = device_and_dtype(build.dtype_name)
    encoders = load_text_encoders(build.paths, dtype=dtype)
    for name in ("text_encoder", "text_encoder_2"):
        encoders[name].to(device)
    for k in build.shard.progress(text_misses, total, desc="text", unit="caption", disable=not build.progress):
        tensors = encode_caption(encoders, captions[k], device)
        build.store(build.text_root, k, tensors, {"kind": "text"})
    del encoders
    free_memory()


def _encode_latents(
    build: _Build, plans: list[_Plan], validation: _Validation | None, siglip_keys: set[str | None]
) -> None:
    """The VAE (latents, i2v condition latents), loaded only when an entry is missing, decoding one sample ahead.
    Keeps the first frames of the samples in `siglip_keys` for the SigLIP stage, so that it need not decode again."""
    resolved = build.resolved
    vae_jobs, build.stats.hits["latent"] = _missing(resolved, plans, "latent_key")
    build.stats.misses["latent"] = len(vae_jobs)
    val_latent_miss = validation is not None and not entry_intact(
        entry_path(build.validation_root, validation.latent_key)
    )
    total = len(vae_jobs)  # SHARD HOOK: this process's share; the validation latent is the main process's
    vae_jobs = build.shard.share(vae_jobs, "vae", lambda p: p.latent_key, show=build.progress)
    val_latent_miss = val_latent_miss and build.shard.main
    if not (vae_jobs or val_latent_miss):
        return
    device, dtype = device_and_dtype(build.dtype_name)
    vae = load_vae_for_cache(resolved, build.paths, device, dtype)
    for p, frames in build.shard.progress(  # SHARD HOOK: tqdm with every process's total
        _decoded(vae_jobs, resolved.train.seed, build.failed),
        total=total,
        desc="vae",
        unit="clip",
        disable=not build.progress,
    ):
        tensors = {"latents": encode_video_latents(vae, frames, device, dtype)}
        if build.i2v:
            first = to_pil(frames[0])
            tensors["cond_latents"] = encode_cond_latents(vae, first, device)
            if p.image_key in siglip_keys:
                _save_pending(build.pending, p.image_key, first)
        meta = {"kind": "latent", "source": p.sample.id, "bucket": "x".join(map(str, p.sample.bucket))}
        build.store(vae_root(resolved, p.sample.dataset), p.latent_key, tensors, meta)
        del frames, tensors
    if val_latent_miss:
        cond = encode_cond_latents(vae, validation.image, device)
        build.store(build.validation_root, validation.latent_key, {"cond_latents": cond}, {"kind": "validation"})
    del vae
    free_memory()


def _encode_siglip(build: _Build, jobs: list[_Plan], hits: int, validation: _Validation | None) -> None:
    """SigLIP (i2v), loaded only when an entry is missing, on the first frames the VAE stage kept (a sample whose
    frame is not there is decoded again)."""
    resolved, failed = build.resolved, build.failed
    jobs = [p for p in jobs if id(p.sample) not in failed]
    build.stats.hits["siglip"] = hits
    build.stats.misses["siglip"] = len(jobs)
    val_image_miss = validation is not None and not entry_intact(
        entry_path(build.validation_root, validation.image_key)
    )
    total = len(jobs)  # SHARD HOOK: this process's share; the validation image is the main process's
    jobs = build.shard.share(jobs, "siglip", lambda p: p.image_key, show=build.progress)
    val_image_miss = val_image_miss and build.shard.main
    if jobs or val_image_miss:
        from hvtune.model.registry import load_vision_encoder

        device, dtype = device_and_dtype(build.dtype_name)
        vision = load_vision_encoder(build.paths, dtype=dtype)
        vision["image_encoder"].to(device)
        for p in build.shard.progress(jobs, total, desc="siglip", unit="clip", disable=not build.progress):
            image = _load_pending(build.pending, p.image_key)
            if image is None:
                try:
                    image = to_pil(decode_sample(p.sample, resolved.train.seed)[0])
                except Exception as e:  # a decode failure skips the sample, never the run
                    failed[id(p.sample)] = _decode_issue(p.sample, e)
                    continue
            embeds = encode_image_embeds(vision, image, device)
            build.store(vae_root(resolved, p.sample.dataset), p.image_key, {"image_embeds": embeds}, {"kind": "siglip"})
        if val_image_miss:
            embeds = encode_image_embeds(vision, validation.image, device)
            build.store(build.validation_root, validation.image_key, {"image_embeds": embeds}, {"kind": "validation"})
        del vision
        free_memory()
    build.shard.wait()  # SHARD HOOK: every process is done with the kept first frames; the main one removes them
    if build.pending.is_dir() and build.shard.main:
        for f in build.pending.iterdir():
            f.unlink(missing_ok=True)
        build.pending.rmdir()


def _drop_failed(build: _Build, result: ScanResult, plans: list[_Plan]) -> list[_Plan]:
    """Drop the samples that failed to decode, and their byte-identical twins (they share the entries), from the
    scan result, reporting why; the plans of the samples left."""
    failed = build.failed
    by_key = {k: failed[id(p.sample)] for p in plans if id(p.sample) in failed for k in (p.latent_key, p.image_key)}
    for p in plans:
        if id(p.sample) in failed:
            continue
        keys = [p.latent_key, *([p.image_key] if build.i2v else [])]
        if not all(entry_intact(entry_path(vae_root(build.resolved, p.sample.dataset), k)) for k in keys):
            twin = next((by_key[k] for k in keys if k in by_key), None)
            reason, detail = (twin.reason, twin.detail) if twin else ("decode_error", "its cache entry was not written")
            failed[id(p.sample)] = Issue(p.sample.dataset, str(p.sample.source), "skipped", reason, detail)
    if failed:
        result.samples = [s for s in result.samples if id(s) not in failed]
        result.issues += list(failed.values())
        plans = [p for p in plans if id(p.sample) not in failed]
    return plans


def _report_cut_captions(build: _Build, result: ScanResult, plans: list[_Plan]) -> None:
    """A caption longer than the encoders read is cut (as the pipeline cuts it): one report line per sample, so the
    user knows the end of that caption is not trained on."""
    cut: dict[str, str | None] = {}
    for p in plans:
        for k, caption in zip(p.text_keys, p.sample.captions, strict=True):
            if k not in cut:
                cut[k] = text_cut(entry_path(build.text_root, k))
            if cut[k]:
                detail = f"caption of {len(caption)} characters cut to {cut[k]}; the rest is not trained on"
                result.issues.append(Issue(p.sample.dataset, str(p.sample.source), "used", "caption_truncated", detail))


def _write_indexes(build: _Build, captions: dict[str, str], plans: list[_Plan], validation: _Validation | None) -> None:
    """Every root's `index.json`: the entries this run used, with the size and sha256 of those it wrote."""
    indexes, written = build.indexes, build.written
    troot, vroot = build.text_root, build.validation_root
    for k, caption in captions.items():
        indexes[troot].add(k, "text", caption, *written[troot].get(k, (None, None)))
    for p in plans:
        vr = vae_root(build.resolved, p.sample.dataset)
        indexes[vr].add(p.latent_key, "latent", p.sample.id, *written[vr].get(p.latent_key, (None, None)))
        if p.image_key:
            indexes[vr].add(p.image_key, "siglip", p.sample.id, *written[vr].get(p.image_key, (None, None)))
    if validation is not None:
        for k, kind in ((validation.latent_key, "validation_latent"), (validation.image_key, "validation_siglip")):
            indexes[vroot].add(k, kind, validation.label, *written[vroot].get(k, (None, None)))
    for idx in indexes.values():
        build.stats.bytes += idx.save()


def _write_manifest(build: _Build, result: ScanResult, plans: list[_Plan], validation: _Validation | None) -> Path:
    """`manifest.json` (manifest.py reads it): the samples left, their entry keys, what the cache was built with."""
    resolved, root = build.resolved, build.root
    t = resolved.train
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
    encoders = {n: build.ids[n] for n in build.names}
    fingerprint = hashlib.sha256(canonical_json({"settings": settings, "encoders": encoders})).hexdigest()
    manifest = {
        "format": FORMAT,
        "task": resolved.task,
        "flavour": t.model_flavour,
        "settings": settings,
        "fingerprint": fingerprint,
        "encoders": encoders,
        "options": {"text": build.tparams, "vae": build.vopts, "pixels": PIXELS},
        "window_seed": t.seed,
        "roots": {
            "text": _rel(build.text_root, root),
            "vae": {d: _rel(vae_root(resolved, d), root) for d in result.datasets},
            "validation": _rel(build.validation_root, root),
        },
        "validation_prompt_key": build.text_key(t.validation_prompt),
        "validation_negative_key": build.text_key(t.validation_negative_prompt),
        "empty_prompt_key": build.text_key(""),
        "validation_image": (
            {"latent_key": validation.latent_key, "image_key": validation.image_key, "source": validation.label}
            if validation
            else None
        ),
        "samples_hash": hashlib.sha256(canonical_json(samples)).hexdigest(),
        "samples": samples,
        "sources": source_stats(
            [q for p in plans for q in (p.sample.source, p.sample.source.with_suffix(".txt"))] + result.metadata_files
        ),
    }
    mpath = manifest_path(resolved)
    build.stats.bytes += write_text_atomic(mpath, json.dumps(manifest, indent=1, ensure_ascii=False))
    return mpath


def _summary(build: _Build, result: ScanResult, report: Path, mpath: Path, started: float) -> CacheSummary:
    """What `hvtune cache` prints: samples found and used, skip reasons, buckets, hits and misses, bytes written."""
    buckets: Counter = Counter()
    draws: Counter = Counter()
    for s in result.samples:
        buckets[s.bucket] += 1
        draws[s.bucket] += s.repeats + 1
    stats = build.stats
    return CacheSummary(
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
        batch_size=build.resolved.train.train_batch_size,
    )


def _missing(resolved: ResolvedConfig, plans: list[_Plan], attr: str) -> tuple[list[_Plan], int]:
    """(plans whose entry `attr` is missing, one per distinct entry; number of distinct entries present)."""
    seen: set[tuple[Path, str]] = set()
    jobs, hits = [], 0
    for p in plans:
        where = (vae_root(resolved, p.sample.dataset), getattr(p, attr))
        if where in seen:
            continue
        seen.add(where)
        if entry_intact(entry_path(*where)):  # a damaged entry is a miss: encoded again
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
    from hvtune.data.media import MediaError

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
        problems.append(f"{mpath}: missing ({rerun_hint(resolved)})")
    else:
        try:
            data = json.loads(mpath.read_text(encoding="utf-8"))
            manifest = parse_manifest(resolved, mpath, data)
            roots |= set(manifest.vae_roots.values())
            for what, path in manifest.entry_files():
                damage = entry_damage(path)
                if damage:
                    problems.append(f"{path}: {damage} ({what})")
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


def print_verify(resolved: ResolvedConfig) -> int:
    """`hvtune cache verify`: one line per problem, then the command that repairs them; exit 1 when any."""
    problems = verify_cache(resolved)
    for problem in problems:
        print(f"  {problem}")
    if not problems:
        print("cache verify: every entry intact")
        return 0
    print(f"cache verify: {len(problems)} problem(s); to repair: {repair_hint(resolved)}")
    return 1


# ---------------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """`python -m hvtune.cache.build --config PATH [--key=value ...]` (the CLI's `hvtune cache` does the same)."""
    from hvtune.config.settings import load_config

    parser = argparse.ArgumentParser(prog="python -m hvtune.cache.build")
    parser.add_argument("--config", required=True)
    parser.add_argument("--verify", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    try:
        resolved = load_config(args.config, argv=overrides)
        if args.verify:
            return print_verify(resolved)
        build_cache(resolved)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
