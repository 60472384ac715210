"""`hvtune cache`: builds the content-addressed caches - text embeddings, VAE latents, i2v conditions, validation
prompts - and the manifest.

`hvtune cache` runs `build_cache` once so that training never loads the text encoders, the VAE encoder or SigLIP.
A build runs in stages: scan the datasets, plan every entry's key (plan.py), encode what the text, VAE and SigLIP
entries lack (encode_missing.py), drop the samples that failed to decode, then write the report (report.py), the
roots' indexes and the manifest. What a key holds: keys.py; where entries lie: layout.py and store.py; what each
entry holds and how it is encoded: encoders.py; what training reads: manifest.py; the rehash: verify.py. On N processes
(`accelerate launch`): shard.py, hooked in at the lines marked `SHARD HOOK`.

Memory. Encoders are loaded one group at a time - the text encoders, then the VAE, then SigLIP - each only when it
has misses, and freed before the next. Clips are decoded one at a time (one decoded ahead on a helper thread) and
never held, so peak memory does not grow with the dataset.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import ExitStack
from pathlib import Path

from hvtune.cache.encode_missing import encode_latents, encode_siglip, encode_text
from hvtune.cache.keys import FORMAT, PIXELS, canonical_json
from hvtune.cache.layout import CacheLayout
from hvtune.cache.manifest import ManifestSample, source_stats
from hvtune.cache.plan import Build, EntryPlan, ValidationPlan, missing, plan_captions, plan_keys
from hvtune.cache.report import CacheSummary, summarize, write_report
from hvtune.cache.shard import Shard
from hvtune.cache.store import CacheError, RootIndex, entry_intact, entry_path, remove_temp_files, text_cut
from hvtune.config.settings import ResolvedConfig
from hvtune.data.datasets import Issue, ProbeIndex, ScanResult, scan
from hvtune.files import disk_full_message, is_disk_full, write_text_atomic
from hvtune.locks import exclusive_lock


def build_cache(resolved: ResolvedConfig, *, report_path: Path | None = None, progress: bool = True) -> CacheSummary:
    """Scan the datasets, encode whatever the caches lack, write the report, indexes and the manifest."""
    started = time.time()
    layout = CacheLayout(resolved)
    shard = Shard.start(layout.root)  # SHARD HOOK
    lock = ExitStack()
    if shard.main:  # SHARD HOOK: the main process holds the lock for all
        lock.enter_context(exclusive_lock(layout.root / ".lock", "hvtune cache", _cache_refusal(layout.root)))
    try:
        build = Build(layout, progress, shard)
        report = Path(report_path) if report_path else layout.report_path
        with shard.main_first():  # SHARD HOOK: the others read the main process's probe index
            result = _scan(build, report)
        plans, validation = plan_keys(build, result)
        _open_roots(build, plans)
        captions = plan_captions(build, plans)
        shard.sync(build, plans)  # SHARD HOOK: every process sees the same misses
        encode_text(build, captions)
        shard.sync(build, plans)  # SHARD HOOK
        siglip_jobs, siglip_hits = missing(build, plans, "image_key") if build.i2v else ([], 0)
        encode_latents(build, plans, validation, {p.image_key for p in siglip_jobs})
        shard.sync(build, plans)  # SHARD HOOK: the VAE phase's decode failures, on every process
        if build.i2v:
            encode_siglip(build, siglip_jobs, siglip_hits, validation)
        shard.sync(build, plans, final=True)  # SHARD HOOK: all finished; failures, written entries, bytes merged
        batch_size = resolved.train.train_batch_size
        if not shard.main:  # SHARD HOOK: one process writes the report, the indexes and the manifest
            return summarize(result, build.stats, batch_size, report, layout.manifest_path, time.time() - started)
        plans = _drop_failed(build, result, plans)
        _report_cut_captions(build, result, plans)
        build.stats.bytes += write_report(result, report)
        _write_indexes(build, captions, plans, validation)
        mpath = _write_manifest(build, result, plans, validation)
        summary = summarize(result, build.stats, batch_size, report, mpath, time.time() - started)
        if progress:
            print(summary.format())
        return summary
    except OSError as e:
        if not is_disk_full(e):
            raise
        fix = f"free space there or point cache_dir at a bigger disk, then {layout.rerun_hint} (entries already "
        raise CacheError(disk_full_message(layout.root, "the cache", fix + "written are kept)")) from e
    finally:
        lock.close()  # SHARD HOOK
        shard.close()  # SHARD HOOK


def _cache_refusal(root: Path):
    return lambda holder: f"another `hvtune cache` is writing {root}: {holder}; wait for it to finish"


def _scan(build: Build, report: Path) -> ScanResult:
    """The datasets' samples (probing only files the probe index does not know). A dataset with nothing usable stops
    the build here, before any encoder loads, with the report written."""
    probe = ProbeIndex(build.layout.probe_index_path)
    result = scan(build.resolved, probe_index=probe, progress=build.progress and build.shard.main)  # SHARD HOOK
    if build.shard.main:  # SHARD HOOK: the others read the main process's probe index
        probe.save()
    if result.empty_datasets():
        write_report(result, report, write=build.shard.main)  # raises, naming the datasets; SHARD HOOK: one writes
    return result


def _open_roots(build: Build, plans: list[EntryPlan]) -> None:
    """Every root this run writes to: the temp files a killed run left removed, its index read."""
    roots = {build.layout.text_root, build.layout.validation_root, *(build.vae_root(p) for p in plans)}
    for r in roots:
        if build.shard.main:  # SHARD HOOK: before any process writes (the sync after the plan)
            remove_temp_files(r)
    build.indexes = {r: RootIndex(r) for r in roots}
    build.written = {r: {} for r in roots}


def _drop_failed(build: Build, result: ScanResult, plans: list[EntryPlan]) -> list[EntryPlan]:
    """Drop the samples that failed to decode, and their byte-identical twins (they share the entries), from the
    scan result, reporting why; the plans of the samples left."""
    failed = build.failed
    by_key = {k: failed[id(p.sample)] for p in plans if id(p.sample) in failed for k in (p.latent_key, p.image_key)}
    for p in plans:
        if id(p.sample) in failed:
            continue
        keys = [p.latent_key, *([p.image_key] if build.i2v else [])]
        if not all(entry_intact(entry_path(build.vae_root(p), k)) for k in keys):
            twin = next((by_key[k] for k in keys if k in by_key), None)
            reason, detail = (twin.reason, twin.detail) if twin else ("decode_error", "its cache entry was not written")
            failed[id(p.sample)] = Issue(p.sample.dataset, str(p.sample.source), "skipped", reason, detail)
    if failed:
        result.samples = [s for s in result.samples if id(s) not in failed]
        result.issues += list(failed.values())
        plans = [p for p in plans if id(p.sample) not in failed]
    return plans


def _report_cut_captions(build: Build, result: ScanResult, plans: list[EntryPlan]) -> None:
    """A caption longer than the encoders read is cut (as the pipeline cuts it): one report line per sample, so the
    user knows the end of that caption is not trained on."""
    cut: dict[str, str | None] = {}
    for p in plans:
        for k, caption in zip(p.text_keys, p.sample.captions, strict=True):
            if k not in cut:
                cut[k] = text_cut(entry_path(build.layout.text_root, k))
            if cut[k]:
                detail = f"caption of {len(caption)} characters cut to {cut[k]}; the rest is not trained on"
                result.issues.append(Issue(p.sample.dataset, str(p.sample.source), "used", "caption_truncated", detail))


def _write_indexes(
    build: Build, captions: dict[str, str], plans: list[EntryPlan], validation: ValidationPlan | None
) -> None:
    """Every root's `index.json`: the entries this run used, with the size and sha256 of those it wrote."""
    indexes, written = build.indexes, build.written
    troot, vroot = build.layout.text_root, build.layout.validation_root
    for k, caption in captions.items():
        indexes[troot].add(k, "text", caption, *written[troot].get(k, (None, None)))
    for p in plans:
        vr = build.vae_root(p)
        indexes[vr].add(p.latent_key, "latent", p.sample.id, *written[vr].get(p.latent_key, (None, None)))
        if p.image_key:
            indexes[vr].add(p.image_key, "siglip", p.sample.id, *written[vr].get(p.image_key, (None, None)))
    if validation is not None:
        for k, kind in ((validation.latent_key, "validation_latent"), (validation.image_key, "validation_siglip")):
            indexes[vroot].add(k, kind, validation.label, *written[vroot].get(k, (None, None)))
    for idx in indexes.values():
        build.stats.bytes += idx.save()


def _write_manifest(
    build: Build, result: ScanResult, plans: list[EntryPlan], validation: ValidationPlan | None
) -> Path:
    """`manifest.json` (manifest.py reads it): the samples left, their entry keys, what the cache was built with."""
    resolved, layout = build.resolved, build.layout
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
    settings = layout.settings
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
            "text": _rel(layout.text_root, layout.root),
            "vae": {d: _rel(layout.vae_root(d), layout.root) for d in result.datasets},
            "validation": _rel(layout.validation_root, layout.root),
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
        "dataset_files": {d: {"root": str(root), "files": rels} for d, (root, rels) in result.files.items()},
    }
    mpath = layout.manifest_path
    build.stats.bytes += write_text_atomic(mpath, json.dumps(manifest, indent=1, ensure_ascii=False))
    return mpath


def _rel(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())
