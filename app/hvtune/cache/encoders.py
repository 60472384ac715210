"""What runs the encoders for `hvtune cache`: one caption, clip or frame in, one cache entry's tensors out.

Entries. text: `prompt_embeds` (L, D) = Qwen2.5-VL hidden_states[-3] with the 108-token template prefix dropped and
`prompt_embeds_2` (L2, D2) = ByT5 over the quoted text, both valid tokens only (L2 is 0 without quoted text); computed
by the diffusers pipeline's own `_get_mllm_prompt_embeds` / `_get_byt5_prompt_embeds`, one caption at a time (so a
value never depends on what it was batched with). latent: `latents` (32, F', H', W') = VAE mode * scaling_factor of
pixels in [-1, 1]; i2v adds `cond_latents` (32, 1, H', W') = the pipeline's `_get_image_latents` on the window's first
frame. siglip (i2v): `image_embeds` (N, Dv) = the pipeline's `_get_image_embeds` on the same frame.

VAE patch convolution. diffusers 0.42.1 has no patch-conv option on `AutoencoderKLHunyuanVideo15`; SimpleTuner's
`vae_enable_patch_conv` swaps the VAE's causal Conv3d for one that splits its input along time when it is large
(Tencent's `PatchCausalConv3d`). `enable_patch_conv` does the same to the diffusers VAE: each causal conv's Conv3d
runs on overlapping time chunks (kernel-1 frames of overlap, so the result is the same convolution) whenever its input
exceeds `PATCH_CONV_BYTES` (keys.py: it is part of the latent keys).
"""

from __future__ import annotations

import gc
import math
import os
from typing import Any

from hvtune.cache.keys import PATCH_CONV_BYTES, TEXT_2_MAX_LENGTH, TEXT_CROP_START, TEXT_MAX_LENGTH, system_message
from hvtune.config.settings import ResolvedConfig
from hvtune.data.datasets import Sample

GPU_DRIVER_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")  # NVIDIA, AMD ROCm, WSL2: torch needs one of them


def gpu_present() -> bool:
    """Decided without importing torch when no GPU driver node exists (torch could find no GPU either): on a fully
    cached rerun the torch import would be most of the run (2.5 of 3 s on a 2-core CPU)."""
    if not any(os.path.exists(p) for p in GPU_DRIVER_NODES):
        return False
    import torch

    return torch.cuda.is_available()


def encoder_dtype_name(resolved: ResolvedConfig) -> str:
    """The text and vision encoders' dtype, part of their cache keys: bfloat16 on a GPU with mixed_precision bf16,
    else float32."""
    return "bfloat16" if resolved.train.mixed_precision == "bf16" and gpu_present() else "float32"


def vae_encode_dtype_name(resolved: ResolvedConfig) -> str:
    """The VAE's dtype, part of every latent key (`keys.vae_options`), so a cache built with another `vae_dtype` is
    never reused: SimpleTuner's vae_dtype on a GPU, float32 on the CPU (`registry.vae_dtype_name`)."""
    from hvtune.model.registry import vae_dtype_name

    return vae_dtype_name(resolved.train, gpu_present())


def device_and_dtype(dtype_name: str):
    """Where and in what dtype to encode; imports torch, so only called when something has to be encoded."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu"), getattr(torch, dtype_name)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def encode_caption(encoders: dict, caption: str, device) -> dict[str, Any]:
    """Valid tokens only of the pipeline's two prompt encodings, for one caption."""
    import torch
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import HunyuanVideo15Pipeline as P

    with torch.inference_mode():
        embeds, mask = P._get_mllm_prompt_embeds(
            text_encoder=encoders["text_encoder"],
            tokenizer=encoders["tokenizer"],
            prompt=[caption],
            device=device,
            tokenizer_max_length=TEXT_MAX_LENGTH,
            system_message=system_message(),
            crop_start=TEXT_CROP_START,
        )
        embeds_2, mask_2 = P._get_byt5_prompt_embeds(
            tokenizer=encoders["tokenizer_2"],
            text_encoder=encoders["text_encoder_2"],
            prompt=[caption],
            device=device,
            tokenizer_max_length=TEXT_2_MAX_LENGTH,
        )
    return {
        "prompt_embeds": embeds[0][mask[0].bool()].clone(),
        "prompt_embeds_2": embeds_2[0][mask_2[0].bool()].clone(),
    }


_PATCH_CONV_CLASS = None


def _patch_conv_class():
    global _PATCH_CONV_CLASS
    if _PATCH_CONV_CLASS is None:
        from torch import nn

        class PatchConv3d(nn.Conv3d):
            """Conv3d (time stride 1, no time padding) that runs on overlapping time chunks when its input is big."""

            patch_bytes = PATCH_CONV_BYTES

            def forward(self, x):
                import torch

                k = self.kernel_size[0]
                frames = x.shape[2]
                size = x.numel() * x.element_size()
                if frames <= k or size <= self.patch_bytes:
                    return super().forward(x)
                out_frames = frames - k + 1
                parts = min(out_frames, math.ceil(size / self.patch_bytes))
                step = math.ceil(out_frames / parts)
                outs = [
                    super(PatchConv3d, self).forward(x[:, :, a : a + step + k - 1]) for a in range(0, out_frames, step)
                ]
                return torch.cat(outs, dim=2)

        _PATCH_CONV_CLASS = PatchConv3d
    return _PATCH_CONV_CLASS


def enable_patch_conv(vae, patch_bytes: int = PATCH_CONV_BYTES) -> int:
    """Make every causal Conv3d of a diffusers HunyuanVideo 1.5 VAE run on time chunks above `patch_bytes` of input.
    Returns how many convolutions were patched."""
    from diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15 import HunyuanVideo15CausalConv3d

    cls = _patch_conv_class()
    patched = 0
    for module in vae.modules():
        if isinstance(module, HunyuanVideo15CausalConv3d):
            conv = module.conv
            if conv.stride[0] == 1 and conv.dilation[0] == 1 and conv.padding[0] == 0:
                conv.__class__ = cls
                conv.patch_bytes = patch_bytes
                patched += 1
    return patched


def load_vae_for_cache(resolved: ResolvedConfig, paths, device, dtype):
    from hvtune.model.registry import load_vae

    vae = load_vae(paths, dtype=dtype).to(device)
    t = resolved.train
    if t.vae_enable_tiling is True:
        vae.enable_tiling()
    if t.vae_enable_slicing:
        vae.enable_slicing()
    if t.vae_enable_patch_conv:
        enable_patch_conv(vae)
    return vae


def image_processor():
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    # the i2v pipeline's own processor settings
    return HunyuanVideo15ImageProcessor(vae_scale_factor=16, do_resize=False, do_convert_rgb=True)


def encode_video_latents(vae, frames_uint8, device, dtype):
    """(F, 3, H, W) uint8 -> (32, F', H', W') = VAE mode * scaling_factor of pixels in [-1, 1]."""
    import torch
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5_image2video import retrieve_latents

    from hvtune.data.media import to_model_pixels

    with torch.inference_mode():
        x = to_model_pixels(frames_uint8)[None].to(device, dtype)
        latents = retrieve_latents(vae.encode(x), sample_mode="argmax") * vae.config.scaling_factor
    return latents[0]


def encode_latents_or_tiled(vae, frames_uint8, device, dtype):
    """`encode_video_latents`; a clip that does not fit the GPU (torch.OutOfMemoryError) is encoded again tiled.
    Returns (latents, tiled_after_oom). A second out-of-memory error propagates: the caller reports the clip."""
    import torch

    try:
        return encode_video_latents(vae, frames_uint8, device, dtype), False
    except torch.OutOfMemoryError:
        if vae.use_tiling:
            raise
    free_memory()
    vae.enable_tiling()
    try:
        return encode_video_latents(vae, frames_uint8, device, dtype), True
    finally:
        vae.disable_tiling()
        free_memory()


def encode_cond_latents(vae, image, device):
    """The i2v pipeline's `_get_image_latents` on a PIL image already at the bucket size -> (32, 1, h, w)."""
    import torch
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5_image2video import (
        HunyuanVideo15ImageToVideoPipeline as I2V,
    )

    with torch.inference_mode():
        out = I2V._get_image_latents(vae, image_processor(), image, image.height, image.width, device)
    return out[0]


def encode_image_embeds(vision: dict, image, device):
    """The i2v pipeline's `_get_image_embeds` (SigLIP last_hidden_state) -> (N, Dv)."""
    import torch
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5_image2video import (
        HunyuanVideo15ImageToVideoPipeline as I2V,
    )

    with torch.inference_mode():
        out = I2V._get_image_embeds(vision["image_encoder"], vision["feature_extractor"], image, device)
    return out[0]


def to_pil(frame_uint8):
    from PIL import Image

    return Image.fromarray(frame_uint8.permute(1, 2, 0).contiguous().numpy())


def decode_sample(sample: Sample, seed: int):
    """uint8 (F, 3, H, W) at the bucket size."""
    from hvtune.data.media import read_image, read_video

    if sample.kind == "image":
        return read_image(sample.source, size=sample.size)
    return read_video(
        sample.source,
        num_frames=sample.frames,
        size=sample.size,
        frame_rate=sample.frame_rate,
        seed=seed,
        key=sample.sha256,
        info=sample.info,
    )
