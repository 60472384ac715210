"""The encoder stages of a build - text, VAE, SigLIP - each loading its encoders only when entries are missing and
encoding only those, freeing them before the next stage.

Clips are decoded one at a time (one decoded ahead on a helper thread) and never held, so peak memory does not grow
with the dataset; the VAE stage keeps the first frames the SigLIP stage needs, so that it need not decode again.
What each entry holds and how it is encoded: encoders.py.
"""

from __future__ import annotations

from pathlib import Path

from hvtune.cache.encoders import (
    decode_sample,
    device_and_dtype,
    encode_caption,
    encode_cond_latents,
    encode_image_embeds,
    encode_latents_or_tiled,
    free_memory,
    load_vae_for_cache,
    to_pil,
)
from hvtune.cache.plan import Build, EntryPlan, ValidationPlan, missing
from hvtune.data.datasets import Issue, Sample
from hvtune.files import atomic_path


def encode_text(build: Build, captions: dict[str, str]) -> None:
    """The text encoders, loaded only when a caption's entry is missing."""
    text_misses = [k for k in captions if not build.reusable(build.layout.text_root, k)]
    build.stats.hits["text"] = len(captions) - len(text_misses)
    build.stats.misses["text"] = len(text_misses)
    total = len(text_misses)  # SHARD HOOK: this process's share
    text_misses = build.shard.share(text_misses, "text", unit="caption", show=build.progress)
    if not text_misses:
        return
    from hvtune.model.registry import load_text_encoders

    device, dtype = device_and_dtype(build.dtype_name)
    encoders = load_text_encoders(build.paths, dtype=dtype)
    for name in ("text_encoder", "text_encoder_2"):
        encoders[name].to(device)
    for k in build.shard.progress(text_misses, total, desc="text", unit="caption", disable=not build.progress):
        tensors = encode_caption(encoders, captions[k], device)
        build.store(build.layout.text_root, k, tensors, {"kind": "text"})
    del encoders
    free_memory()


def encode_latents(
    build: Build, plans: list[EntryPlan], validation: ValidationPlan | None, siglip_keys: set[str | None]
) -> None:
    """The VAE (latents, i2v condition latents), loaded only when an entry is missing, decoding one sample ahead.
    Keeps the first frames of the samples in `siglip_keys` for the SigLIP stage, so that it need not decode again."""
    resolved = build.resolved
    vae_jobs, build.stats.hits["latent"] = missing(build, plans, "latent_key")
    build.stats.misses["latent"] = len(vae_jobs)
    val_latent_miss = validation is not None and build.validation_missing(validation.latent_key)
    total = len(vae_jobs)  # SHARD HOOK: this process's share; the validation latent is the main process's
    vae_jobs = build.shard.share(vae_jobs, "vae", lambda p: p.latent_key, unit="clip", show=build.progress)
    val_latent_miss = val_latent_miss and build.shard.main
    if not (vae_jobs or val_latent_miss):
        return
    device, dtype = device_and_dtype(build.vae_dtype_name)
    vae = load_vae_for_cache(resolved, build.paths, device, dtype)
    for p, frames in build.shard.progress(  # SHARD HOOK: progress with every process's total
        _decoded(vae_jobs, resolved.train.seed, build.failed),
        total=total,
        desc="vae",
        unit="clip",
        disable=not build.progress,
    ):
        latents = _encode_or_report(build, p, vae, frames, device, dtype)
        if latents is None:
            continue
        tensors = {"latents": latents[0]}
        if build.i2v:
            first = to_pil(frames[0])
            tensors["cond_latents"] = encode_cond_latents(vae, first, device)
            if p.image_key in siglip_keys:
                _save_pending(build.pending, p.image_key, first)
        meta = {"kind": "latent", "source": p.sample.id, "bucket": "x".join(map(str, p.sample.bucket))}
        if latents[1]:
            meta["tiled_after_out_of_memory"] = True
        build.store(build.vae_root(p), p.latent_key, tensors, meta)
        del frames, tensors
    if val_latent_miss:
        cond = encode_cond_latents(vae, validation.image, device)
        build.store(build.layout.validation_root, validation.latent_key, {"cond_latents": cond}, {"kind": "validation"})
    del vae
    free_memory()


def encode_siglip(build: Build, jobs: list[EntryPlan], hits: int, validation: ValidationPlan | None) -> None:
    """SigLIP (i2v), loaded only when an entry is missing, on the first frames the VAE stage kept (a sample whose
    frame is not there is decoded again)."""
    resolved, failed = build.resolved, build.failed
    jobs = [p for p in jobs if id(p.sample) not in failed]
    build.stats.hits["siglip"] = hits
    build.stats.misses["siglip"] = len(jobs)
    val_image_miss = validation is not None and build.validation_missing(validation.image_key)
    total = len(jobs)  # SHARD HOOK: this process's share; the validation image is the main process's
    jobs = build.shard.share(jobs, "siglip", lambda p: p.image_key, unit="clip", show=build.progress)
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
            build.store(build.vae_root(p), p.image_key, {"image_embeds": embeds}, {"kind": "siglip"})
        if val_image_miss:
            embeds = encode_image_embeds(vision, validation.image, device)
            build.store(
                build.layout.validation_root, validation.image_key, {"image_embeds": embeds}, {"kind": "validation"}
            )
        del vision
        free_memory()
    build.shard.wait()  # SHARD HOOK: every process is done with the kept first frames; the main one removes them
    if build.pending.is_dir() and build.shard.main:
        for f in build.pending.iterdir():
            f.unlink(missing_ok=True)
        build.pending.rmdir()


def _encode_or_report(build: Build, plan: EntryPlan, vae, frames, device, dtype):
    """(latents, tiled after an out-of-memory error), or None when the clip does not fit the GPU even tiled: it is
    then reported in the cache report (skipped, out_of_memory), never a crash of the whole build."""
    import torch

    try:
        return encode_latents_or_tiled(vae, frames, device, dtype)
    except torch.OutOfMemoryError as e:
        free_memory()
        size = "x".join(map(str, plan.sample.bucket))
        detail = f"the VAE encode at {size} did not fit the GPU, tiled or not: {type(e).__name__}"
        sample = plan.sample
        build.failed[id(sample)] = Issue(sample.dataset, str(sample.source), "skipped", "out_of_memory", detail)
        return None


def _decode_issue(sample: Sample, e: Exception) -> Issue:
    from hvtune.data.media import MediaError

    if isinstance(e, MediaError):
        return Issue(sample.dataset, str(sample.source), "skipped", e.reason, e.detail)
    return Issue(sample.dataset, str(sample.source), "skipped", "decode_error", f"{type(e).__name__}: {e}")


def _decoded(jobs: list[EntryPlan], seed: int, failed: dict[int, Issue]):
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
