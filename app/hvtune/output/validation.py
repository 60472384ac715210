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
    offload_transformer_for_decode: bool = False,
) -> torch.Tensor:
    """Returns uint8 frames (F, 3, H, W)."""
    import numpy as np
    from diffusers.utils.torch_utils import randn_tensor

    dtype = next(p.dtype for p in transformer.parameters() if p.dtype.is_floating_point)
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

    if offload_transformer_for_decode:  # enable_model_cpu_offload: the decode gets the GPU to itself
        transformer.to("cpu")
    video = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    if offload_transformer_for_decode:
        transformer.to(device)
    video = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, F, H, W)
    return video.permute(1, 0, 2, 3).cpu()


def validation_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "validation" / f"step_{step:06d}"


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
