"""Validation videos during training, from cached prompt embeddings (no text encoder is ever loaded here).

The sampler is the diffusers HunyuanVideo 1.5 pipeline's denoising loop (same sigmas, scheduler, classifier-free
guidance and VAE decode; tests check it matches `HunyuanVideo15Pipeline` for t2v) written out so that i2v can take
its condition latent and SigLIP embedding from the cache: the i2v pipeline insists on encoding a PIL image itself.
Noise comes from a CPU generator seeded with the validation seed, so every device draws the same starting latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hvtune.output.vae_decode import ValidationVAE, decode_latents
from hvtune.run_files import RunFiles
from hvtune.train.batches import text_entry


@dataclass
class TextCondition:
    embeds: torch.Tensor  # (1, L, D)
    mask: torch.Tensor  # (1, L)
    embeds_2: torch.Tensor  # (1, L2, D2)
    mask_2: torch.Tensor  # (1, L2)

    def to(self, device, dtype) -> TextCondition:
        return TextCondition(
            self.embeds.to(device, dtype), self.mask.to(device), self.embeds_2.to(device, dtype), self.mask_2.to(device)
        )


@dataclass
class ImageCondition:
    cond_latent: torch.Tensor  # (1, C, 1, h, w), scaled like the training latents
    image_embeds: torch.Tensor  # (1, N, Dv)


@torch.no_grad()
def sample_video(
    transformer, vae, scheduler, *, offload_transformer_for_decode: bool = False, **inputs
) -> torch.Tensor:
    """Returns uint8 frames (F, 3, H, W): `sample_latents` then `decode_latents` (`inputs`: sample_latents')."""
    latents = sample_latents(transformer, vae, scheduler, **inputs)
    return decode_latents(transformer, vae, latents, inputs.get("device", "cpu"), offload_transformer_for_decode)


@torch.no_grad()
def sample_latents(
    transformer,
    vae,
    scheduler,
    *,
    prompt: TextCondition,
    negative: TextCondition | None,
    width: int,
    height: int,
    num_frames: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    image: ImageCondition | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The denoised latents (1, C, F', H', W') of one validation video; `vae` gives only its compression ratios."""
    import numpy as np

    dtype = next(p.dtype for p in transformer.parameters() if p.dtype.is_floating_point)
    latents, cond, mask, image_embeds = _start(
        transformer, vae, (num_frames, height, width), seed, image, device, dtype
    )
    prompt = prompt.to(device, dtype)
    use_cfg = guidance_scale > 1.0 and negative is not None
    negative = negative.to(device, dtype) if use_cfg else None

    sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
    scheduler.set_timesteps(sigmas=sigmas, device=device)

    def predict(text: TextCondition, model_input, timestep):
        return transformer(
            hidden_states=model_input,
            image_embeds=image_embeds,
            timestep=timestep,
            encoder_hidden_states=text.embeds,
            encoder_attention_mask=text.mask,
            encoder_hidden_states_2=text.embeds_2,
            encoder_attention_mask_2=text.mask_2,
            return_dict=False,
        )[0]

    for t in scheduler.timesteps:
        model_input = torch.cat([latents, cond, mask], dim=1)
        timestep = t.expand(1).to(dtype)
        noise_pred = predict(prompt, model_input, timestep)
        if use_cfg:
            uncond = predict(negative, model_input, timestep)
            noise_pred = uncond + guidance_scale * (noise_pred - uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents


def _start(transformer, vae, size: tuple[int, int, int], seed: int, image: ImageCondition | None, device, dtype):
    """(starting noise, condition latents, condition mask, image embeddings) for `size` = (frames, height, width)."""
    from diffusers.utils.torch_utils import randn_tensor

    num_frames, height, width = size
    cfg = transformer.config
    channels = cfg.out_channels
    latent_frames = (num_frames - 1) // vae.temporal_compression_ratio + 1
    shape = (
        1,
        channels,
        latent_frames,
        height // vae.spatial_compression_ratio,
        width // vae.spatial_compression_ratio,
    )
    latents = randn_tensor(
        shape, generator=torch.Generator("cpu").manual_seed(seed), device=torch.device(device), dtype=dtype
    )
    cond = torch.zeros_like(latents)
    mask = torch.zeros((*shape[:1], 1, *shape[2:]), device=device, dtype=dtype)
    if image is None:
        image_embeds = torch.zeros((1, 0, cfg.image_embed_dim), device=device, dtype=dtype)  # t2v: none
    else:
        cond[:, :, :1] = image.cond_latent.to(device, dtype)
        mask[:, :, 0] = 1.0
        image_embeds = image.image_embeds.to(device, dtype)
    return latents, cond, mask, image_embeds


def transformer_leaves_for_decode(cfg) -> bool:
    """enable_model_cpu_offload: the transformer goes to the CPU while the VAE decodes (group offload keeps its
    weights on the host already)."""
    return cfg.enable_model_cpu_offload and not cfg.enable_group_offload


def validation_due(cfg, step: int, total: int, *, final: bool) -> bool:
    if cfg.validation_disable:
        return False
    return final or (cfg.validation_steps > 0 and step % cfg.validation_steps == 0)


@dataclass
class ValidationRound:
    written: list[Path]
    notes: list[str]  # one line per video that needed a retry or was skipped (out of GPU memory)


def render_validation(
    cfg,
    manifest,
    model,
    paths,
    step: int,
    device,
    suffix: str = "",
    *,
    on_out_of_memory=lambda: None,
    write: bool = True,
) -> ValidationRound:
    """The validation videos of optimizer step `step`, written to `RunFiles(output_dir).validation(step)`: the
    validation prompt (with the cached validation image for i2v) and, for i2v with `validation_using_datasets`, the
    first samples of the selected datasets. `suffix` tells the EMA weights' videos from the trained ones.
    An out-of-memory error never ends the run: `on_out_of_memory` runs first (the trainer keeps the step), then the
    decode is retried (`vae_decode.ValidationVAE`), and a video that fits in no setting is skipped with a note.
    `write` False (FSDP2's other processes): sample only, for the sharded transformer's collectives; no decode, no
    file."""
    from hvtune.model.registry import load_scheduler

    scheduler = load_scheduler(paths)
    jobs = _validation_jobs(cfg, manifest)
    was_training = model.training
    model.eval()
    result = ValidationRound([], [])
    with ValidationVAE(cfg, paths, device) as vae:
        for name, prompt_key, image in jobs:
            video = f"validation_{name}{suffix}.mp4"
            frames, note = _render_one(cfg, manifest, model, vae, scheduler, prompt_key, image, on_out_of_memory, write)
            if note:
                result.notes.append(f"validation step {step} {video}: {note}")
            if frames is not None:
                result.written.append(_write(cfg, step, video, frames))
    model.train(was_training)
    return result


def _render_one(cfg, manifest, model, vae: ValidationVAE, scheduler, prompt_key, image, on_out_of_memory, decode=True):
    """(frames or None, a note or None) of one validation video."""
    width, height = cfg.validation_size
    if image is not None:  # the cached condition fixes the size
        height = image.cond_latent.shape[-2] * vae.spatial_compression_ratio
        width = image.cond_latent.shape[-1] * vae.spatial_compression_ratio
    try:
        latents = sample_latents(
            model,
            vae.vae,
            scheduler,
            prompt=_text_condition(manifest, prompt_key),
            negative=_text_condition(manifest, manifest.validation_negative_key),
            width=width,
            height=height,
            num_frames=cfg.validation_num_video_frames,
            num_inference_steps=cfg.validation_num_inference_steps,
            guidance_scale=cfg.validation_guidance,
            seed=cfg.validation_seed if cfg.validation_seed is not None else cfg.seed,
            image=image,
            device=vae.device,
        )
    except torch.OutOfMemoryError:
        on_out_of_memory()
        return None, "skipped: out of GPU memory sampling the video (transformer forward)"
    if not decode:
        return None, None
    with torch.no_grad():
        return vae.decode(model, latents, offload=transformer_leaves_for_decode(cfg), on_out_of_memory=on_out_of_memory)


def _write(cfg, step: int, video: str, frames: torch.Tensor) -> Path:
    from hvtune.data.media import write_video

    target = RunFiles(cfg.output_dir).validation(step) / video
    target.parent.mkdir(parents=True, exist_ok=True)
    write_video(target, frames, fps=cfg.validation_fps)
    return target


def _validation_jobs(cfg, manifest) -> list[tuple[str, str, ImageCondition | None]]:
    """[(video name, prompt key, i2v condition)] of one validation round."""
    image = None
    if manifest.task == "i2v":
        cond_latent, image_embeds = manifest.validation_image_condition()
        image = ImageCondition(cond_latent, image_embeds)
    jobs = [("0", manifest.validation_prompt_key, image)]
    if cfg.validation_using_datasets and manifest.task == "i2v":
        ids = [cfg.eval_dataset_id] if isinstance(cfg.eval_dataset_id, str) else cfg.eval_dataset_id
        jobs += dataset_validation_inputs(manifest, ids, cfg.num_eval_images)
    return jobs


def _text_condition(manifest, key) -> TextCondition:
    return TextCondition(*text_entry(manifest, key))


def dataset_validation_inputs(manifest, dataset_ids: list[str] | None, per_dataset: int):
    """[(name, caption text key, ImageCondition)] for i2v validation on training samples (`validation_using_datasets`):
    the first `per_dataset` samples of each selected dataset (all when `dataset_ids` is None), in manifest order, each
    with its own cached first-frame condition, SigLIP embedding and first caption."""
    from safetensors.torch import load_file

    taken: dict[str, int] = {}
    inputs = []
    for sample in manifest.samples:
        if (dataset_ids is not None and sample.dataset not in dataset_ids) or sample.image_key is None:
            continue
        if taken.get(sample.dataset, 0) >= per_dataset:
            continue
        taken[sample.dataset] = taken.get(sample.dataset, 0) + 1
        cond = load_file(manifest.latent_path(sample))["cond_latents"][:, :1].float()[None]
        embeds = load_file(manifest.image_path(sample))["image_embeds"].float()[None]
        name = f"{sample.dataset}_{taken[sample.dataset] - 1}"
        inputs.append((name, sample.text_keys[0], ImageCondition(cond, embeds)))
    return inputs
