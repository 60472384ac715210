"""The validation decode: the VAE's decoder alone, in SimpleTuner's `vae_dtype`, tiled unless the config says
otherwise, freed before training resumes, and what happens when it does not fit anyway.

- Only the decoder reaches the device (`registry.load_vae_decoder`): validation never encodes.
- dtype: `vae_dtype` (bf16 by default, as SimpleTuner) on a GPU; float32 on the CPU (`registry.vae_dtype_name`).
- Tiling: `vae_enable_tiling` true or false as set; unset, the decode tiles. diffusers' `tiled_decode` decodes
  256 x 256 px tiles (16 x 16 latents) overlapping by 25% and blends each seam linearly over 64 px
  (`blend_v` / `blend_h`), so an untiled 854x480 x 61-frame decode (~71 GiB in float32) becomes ~7 GiB in bf16
  (`hvtune plan`; docs/PERFORMANCE.md). `vae_enable_slicing` and `vae_enable_patch_conv` are applied as set.
- Out of memory (`torch.OutOfMemoryError`, what torch raises on CUDA and ROCm): the caller's `on_out_of_memory`
  runs first (the trainer writes the step's checkpoint), then the decode is retried tiled, then tiled in bf16; when
  none fits, the video is skipped with one line and training goes on.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hvtune.model.registry import load_vae_decoder, vae_dtype_name


@dataclass(frozen=True)
class DecodeSetting:
    tiled: bool
    dtype: str  # a torch dtype name

    def describe(self) -> str:
        return f"{'tiled' if self.tiled else 'untiled'} {self.dtype}"


def decode_tiling(cfg) -> bool:
    """The validation decode tiles unless `vae_enable_tiling` is false."""
    return cfg.vae_enable_tiling is not False


def decode_attempts(cfg, on_gpu: bool) -> list[DecodeSetting]:
    """The configured decode, then tiled, then tiled in bf16: each setting once, in that order."""
    dtype = vae_dtype_name(cfg, on_gpu)
    attempts = [DecodeSetting(decode_tiling(cfg), dtype), DecodeSetting(True, dtype), DecodeSetting(True, "bfloat16")]
    return list(dict.fromkeys(attempts))


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decode_latents(
    transformer, vae, latents: torch.Tensor, device, offload_transformer_for_decode: bool
) -> torch.Tensor:
    """uint8 frames (F, 3, H, W) of `latents`; with `offload_transformer_for_decode` (enable_model_cpu_offload) the
    transformer waits on the CPU, and comes back even when the decode fails."""
    if offload_transformer_for_decode:  # the decode gets the GPU to itself
        transformer.to("cpu")
    try:
        video = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    finally:
        if offload_transformer_for_decode:
            transformer.to(device)
    video = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, F, H, W)
    return video.permute(1, 0, 2, 3).cpu()


class ValidationVAE:
    """The decoder for one validation round: `with ValidationVAE(cfg, paths, device) as vae: vae.decode(...)`; on
    exit the decoder and what it allocated are freed, so training resumes with the memory it had."""

    def __init__(self, cfg, paths, device):
        self.cfg, self.paths, self.device = cfg, paths, torch.device(device)
        self.attempts = decode_attempts(cfg, self.device.type == "cuda")
        self.vae = None

    def __enter__(self) -> ValidationVAE:
        first = self.attempts[0]
        self.vae = load_vae_decoder(self.paths, dtype=getattr(torch, first.dtype)).to(self.device)
        if self.cfg.vae_enable_slicing:
            self.vae.enable_slicing()
        if self.cfg.vae_enable_patch_conv:
            from hvtune.cache.encoders import enable_patch_conv

            enable_patch_conv(self.vae)
        self._apply(first)
        return self

    def __exit__(self, *exc) -> None:
        self.vae = None
        free_device_memory()

    @property
    def spatial_compression_ratio(self) -> int:
        return self.vae.spatial_compression_ratio

    def _apply(self, setting: DecodeSetting) -> None:
        self.vae.enable_tiling() if setting.tiled else self.vae.disable_tiling()
        if self.vae.dtype != getattr(torch, setting.dtype):
            self.vae.to(getattr(torch, setting.dtype))

    def decode(
        self, transformer, latents: torch.Tensor, *, offload: bool, on_out_of_memory: Callable[[], None]
    ) -> tuple[torch.Tensor | None, str | None]:
        """(uint8 frames (F, 3, H, W), None), or (None, the line saying why the video was skipped) when no setting
        fits; (frames, a line) when a retry was needed."""
        failed = []
        for setting in self.attempts:
            self._apply(setting)
            try:
                frames = decode_latents(transformer, self.vae, latents, self.device, offload)
            except torch.OutOfMemoryError:
                free_device_memory()
                on_out_of_memory()
                failed.append(setting.describe())
                continue
            retried = (
                f"out of GPU memory decoding {', '.join(failed)}; decoded {setting.describe()}" if failed else None
            )
            return frames, retried
        return None, f"skipped: out of GPU memory decoding the video ({', '.join(failed)})"
