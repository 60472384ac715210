"""The training objective: flow matching on the HunyuanVideo 1.5 transformer, with counter-based randomness.

x_t = (1 - s) x0 + s * noise, target = noise - x0, plain MSE in float32, model timestep s * 1000 (BRIEF section 1).
Timesteps: s = sigmoid(N(0, 1)) ("sigmoid", the logit-normal of Tencent's and SimpleTuner's trainers) or U(0, 1)
("uniform"), then shifted s' = k s / (1 + (k - 1) s) with k = flow_schedule_shift (k > 1 moves s towards noise).

Every random number (noise, timestep, caption dropout) is drawn on the CPU in float32 from its own generator, seeded
by sha256(seed, epoch, draw, purpose), where `draw` is the sample's position in the epoch's global plan
(batches.plan_epoch). Nothing reads or advances the global RNG, so a sample gets the same noise and timestep on any
device, process count, batch composition or resume point.

Model inputs (HunyuanVideo15Transformer3DModel.forward in diffusers 0.42.1):
- hidden_states = cat([x_t, cond_latents, cond_mask], dim=1): 32 + 32 + 1 = 65 channels. t2v: condition and mask are
  zeros; i2v: the cached first-frame latent in latent frame 0 and a mask of ones there.
- image_embeds: SigLIP embeddings for i2v. For t2v the pipeline passes 729 zero tokens, which the model masks out
  entirely; hvtune passes none, an empty (B, 0, image_embed_dim) tensor, which changes nothing but the sequence
  length (the model's t2v test `torch.all(image_embeds == 0)` holds for it too). The test runs over the whole batch,
  so a batch never mixes t2v and i2v.
- encoder_hidden_states / encoder_attention_mask (Qwen) and encoder_hidden_states_2 / encoder_attention_mask_2
  (ByT5), right-padded only to the batch's longest valid length. This is safe: the model moves the valid tokens of
  each sample to the front (image, ByT5, Qwen), zeroes the padding and builds the attention mask as
  valid(query) & valid(key), so padded tokens are never attended to; the token refiner's pooling is a masked mean;
  the text tokens carry no positional embedding (RoPE is applied to the video tokens only); and the text stream's
  output is dropped after the last block. tests/test_objective.py checks that Qwen padded to 1000 and ByT5 to 256
  (the pipeline's lengths) give the same prediction as the trimmed text.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch

TIMESTEP_MODES = ("sigmoid", "uniform", "beta")


@dataclass(frozen=True)
class TimestepSampling:
    """How a step's sigmas are drawn before the shift (SimpleTuner's flow_* keys): `mode` sigmoid (of
    `sigmoid_scale` x N(0, 1)), uniform, or beta (Beta(*`beta`))."""

    mode: str = "sigmoid"
    sigmoid_scale: float = 1.0
    beta: tuple[float, float] = (2.0, 2.0)


def schedule_options(cfg, scheduler_config: dict | None = None) -> dict[str, Any]:
    """`training_loss` keyword arguments for a TrainConfig's timestep schedule (SimpleTuner's flow_* keys) and the
    caption dropout. `scheduler_config` (the model's noise scheduler config) is needed for auto shift only."""
    return dict(
        shift=cfg.shift,
        sampling=TimestepSampling(
            cfg.timestep_mode, cfg.flow_sigmoid_scale, (cfg.flow_beta_schedule_alpha, cfg.flow_beta_schedule_beta)
        ),
        scheduler_config=scheduler_config,
        caption_dropout_p=cfg.caption_dropout_probability,
    )


def counter_seed(seed: int, *counters: int | str, purpose: str) -> int:
    """A 63-bit seed from sha256 of (purpose, seed, counters): stable across processes, platforms and versions."""
    text = ":".join(str(c) for c in ("hvtune", purpose, seed, *counters))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def counter_generator(seed: int, *counters: int | str, purpose: str) -> torch.Generator:
    """A fresh CPU generator for one (seed, counters, purpose); never the global RNG."""
    return torch.Generator("cpu").manual_seed(counter_seed(seed, *counters, purpose=purpose))


def auto_shift(latent_shape: tuple[int, ...], scheduler_config: dict) -> float:
    """SimpleTuner's flow_schedule_auto_shift (helpers/training/custom_schedule.py apply_flow_schedule_shift, used
    when flow_schedule_shift is 0): exp(diffusers' flux `calculate_shift`) of the sequence length
    frames * (H // patch) * (W // patch) of the latents, with the noise scheduler's config (base/max_image_seq_len,
    base/max_shift) and its `patch_size`, 2 when the config has none (HunyuanVideo's has none)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    frames, height, width = latent_shape[-3:]
    patch = scheduler_config.get("patch_size") or 2
    mu = calculate_shift(
        frames * (height // patch) * (width // patch),
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.15),
    )
    return math.exp(mu)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    if shift <= 0:
        raise ValueError(f"flow_schedule_shift must be > 0, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(
    draws: list[int],
    *,
    seed: int,
    epoch: int,
    shift: float,
    sampling: TimestepSampling = TimestepSampling(),
) -> torch.Tensor:
    """(len(draws),) float32 sigmas in [0, 1] on the CPU, each from its draw's own generator, then shifted."""
    mode, sigmoid_scale, beta = sampling.mode, sampling.sigmoid_scale, sampling.beta
    if mode not in TIMESTEP_MODES:
        raise ValueError(f"unknown timestep_sampling {mode!r}; one of {', '.join(TIMESTEP_MODES)}")
    values = []
    for draw in draws:
        g = counter_generator(seed, epoch, draw, purpose="timestep")
        if mode == "sigmoid":
            # SimpleTuner's flow_sigmoid_scale: sigmoid(scale * N(0, 1)) (helpers/models/common.py)
            values.append(torch.sigmoid(sigmoid_scale * torch.randn((), generator=g, dtype=torch.float32)))
        elif mode == "beta":  # SimpleTuner's flow_use_beta_schedule: Beta(alpha, beta), here from the draw's counter
            import numpy as np

            rng = np.random.default_rng(counter_seed(seed, epoch, draw, purpose="timestep"))
            values.append(torch.tensor(rng.beta(*beta), dtype=torch.float32))
        else:
            values.append(torch.rand((), generator=g, dtype=torch.float32))
    if not values:
        return torch.zeros(0)
    return shift_sigmas(torch.stack(values), shift)


def sample_noise(
    shape: tuple[int, ...], draws: list[int], *, seed: int, epoch: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(len(draws), *shape) float32 noise, each row from its own draw's CPU generator, then moved to `device`."""
    noise = torch.stack(
        [
            torch.randn(shape, generator=counter_generator(seed, epoch, d, purpose="noise"), dtype=torch.float32)
            for d in draws
        ]
    )
    return noise.to(device)


def caption_dropout_mask(draws: list[int], *, seed: int, epoch: int, p: float) -> list[bool]:
    """Which samples train on the empty prompt this epoch (each independently with probability p)."""
    if p <= 0:
        return [False] * len(draws)
    return [
        torch.rand((), generator=counter_generator(seed, epoch, d, purpose="caption_dropout")).item() < p for d in draws
    ]


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[1] >= length:
        return x
    pad = torch.zeros((x.shape[0], length - x.shape[1], *x.shape[2:]), dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], dim=1)


def _valid_length(mask: torch.Tensor, minimum: int) -> int:
    """Length that keeps every valid token of every sample (right padding), at least `minimum`."""
    valid = mask.bool().any(dim=0).nonzero()
    return max(int(valid.max()) + 1 if len(valid) else 0, minimum)


def _text_inputs(batch, dropped: list[bool], empty) -> tuple[torch.Tensor, ...]:
    """The batch's text, with dropped captions replaced by the empty prompt, re-padded to the longest valid length."""
    embeds, mask, embeds_2, mask_2 = batch.prompt_embeds, batch.prompt_mask, batch.prompt_embeds_2, batch.prompt_mask_2
    if not any(dropped):
        return embeds, mask, embeds_2, mask_2
    if empty is None:
        raise ValueError("caption dropout needs the empty prompt's embeddings (empty_prompt)")
    e, m, e2, m2 = empty
    length = max(embeds.shape[1], e.shape[1])
    length_2 = max(embeds_2.shape[1], e2.shape[1])
    embeds, mask = _pad_to(embeds, length).clone(), _pad_to(mask, length).clone()
    embeds_2, mask_2 = _pad_to(embeds_2, length_2).clone(), _pad_to(mask_2, length_2).clone()
    for i, drop in enumerate(dropped):
        if drop:
            embeds[i], mask[i] = _pad_to(e, length)[0].to(embeds), _pad_to(m, length)[0].to(mask)
            embeds_2[i], mask_2[i] = _pad_to(e2, length_2)[0].to(embeds_2), _pad_to(m2, length_2)[0].to(mask_2)
    # the longest caption may have been dropped; Qwen keeps a token for the refiner's mean pooling, ByT5 may be empty
    keep, keep_2 = _valid_length(mask, 1), _valid_length(mask_2, 0)
    return embeds[:, :keep], mask[:, :keep], embeds_2[:, :keep_2], mask_2[:, :keep_2]


def _check_batch(transformer, batch, image_embed_shape: tuple[int, int]) -> None:
    """Shapes the model would otherwise reject deep inside (or, worse, accept): fail naming the samples."""
    who = f"batch of samples {list(getattr(batch, 'sample_indices', []))}"
    x0, cond, mask = batch.latents, batch.cond_latents, batch.cond_mask
    if x0.ndim != 5:
        raise ValueError(f"{who}: latents must be (B, C, F, H, W), got {tuple(x0.shape)}")
    b = x0.shape[0]
    if len(batch.draws) != b:
        raise ValueError(f"{who}: {len(batch.draws)} draws for {b} latents")
    if cond.shape != x0.shape or mask.shape != (b, 1, *x0.shape[2:]):
        raise ValueError(
            f"{who}: condition {tuple(cond.shape)} / mask {tuple(mask.shape)} do not fit latents {tuple(x0.shape)}"
        )
    config = getattr(transformer, "config", None)
    in_channels = getattr(config, "in_channels", None)
    if in_channels is not None and 2 * x0.shape[1] + 1 != in_channels:
        raise ValueError(f"{who}: {x0.shape[1]} latent channels, the transformer takes {in_channels} = 2 x C + 1")
    for name, embeds, m in (
        ("prompt_embeds", batch.prompt_embeds, batch.prompt_mask),
        ("prompt_embeds_2", batch.prompt_embeds_2, batch.prompt_mask_2),
    ):
        if embeds.ndim != 3 or embeds.shape[0] != b or m.shape != embeds.shape[:2]:
            raise ValueError(f"{who}: {name} {tuple(embeds.shape)} / mask {tuple(m.shape)} do not fit batch size {b}")
    if batch.image_embeds is not None:
        image = batch.image_embeds
        if image.ndim != 3 or image.shape[0] != b or image.shape[2] != image_embed_shape[1]:
            raise ValueError(f"{who}: image_embeds {tuple(image.shape)}, expected ({b}, N, {image_embed_shape[1]})")
        zero = [i for i in range(b) if not bool(image[i].any())]
        if zero:  # the model would treat the whole batch as t2v
            raise ValueError(f"{who}: samples {zero} have all-zero image embeddings in an i2v batch")


def _predict(transformer, batch, noisy, sigmas, text, image_embed_shape, *, dtype, device) -> torch.Tensor:
    """The model's prediction for the noisy latents at `sigmas`, with the batch's condition and `text` (the
    `_text_inputs`)."""
    embeds, mask, embeds_2, mask_2 = text
    if batch.image_embeds is None:  # t2v: the model detects t2v by all-zero image embeddings
        image_embeds = torch.zeros((noisy.shape[0], *image_embed_shape), device=device, dtype=dtype)
    else:
        image_embeds = batch.image_embeds.to(device, dtype)
    hidden = torch.cat(
        [noisy, batch.cond_latents.to(device, torch.float32), batch.cond_mask.to(device, torch.float32)], 1
    )
    return transformer(
        hidden_states=hidden.to(dtype),
        timestep=(sigmas * 1000).to(dtype),  # as the pipeline passes it: t in [0, 1000] in the model's dtype
        encoder_hidden_states=embeds.to(device, dtype),
        encoder_attention_mask=mask.to(device),
        encoder_hidden_states_2=embeds_2.to(device, dtype),
        encoder_attention_mask_2=mask_2.to(device),
        image_embeds=image_embeds,
        return_dict=False,
    )[0]


def training_loss(
    transformer,
    batch,
    *,
    seed: int,
    epoch: int,
    shift: float,
    sampling: TimestepSampling = TimestepSampling(),
    scheduler_config: dict | None = None,
    caption_dropout_p: float = 0.0,
    empty_prompt: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    image_embed_shape: tuple[int, int] = (0, 1152),
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Flow-matching MSE of one batch (duck-typed hvtune.train.batches.Batch) and stats.

    `empty_prompt`: (embeds (1, L, D), mask (1, L), embeds_2 (1, L2, D2), mask_2 (1, L2)) used for dropped captions.
    `image_embed_shape`: (tokens, dim) of the t2v zero image embeddings: (0, transformer.config.image_embed_dim), or
    729 tokens for the pipeline's layout.
    `dtype`: the model's compute dtype for its inputs (default: the frozen base's dtype). `device`: where the model
    computes (default: where its first parameter is; pass it when the base is offloaded).
    Stats: `sigmas` (B,), `loss_per_sample` (B,), `caption_dropped` (count); all detached on the CPU."""
    params = [p for p in transformer.parameters() if p.dtype.is_floating_point]
    if dtype is None:  # the frozen base's dtype (LoRA weights are float32 whatever the base is)
        dtype = next((p.dtype for p in params if not p.requires_grad), params[0].dtype)
    if device is None:
        device = next((p.device for p in params if p.requires_grad), params[0].device)
    _check_batch(transformer, batch, image_embed_shape)
    x0 = batch.latents.to(device, torch.float32)
    draws = list(batch.draws)
    if shift <= 0:  # 0: flow_schedule_auto_shift from the latent size with the scheduler's config
        shift = auto_shift(tuple(x0.shape), scheduler_config or {})
    sigmas = sample_sigmas(draws, seed=seed, epoch=epoch, shift=shift, sampling=sampling)
    sigmas = sigmas.to(device)
    noise = sample_noise(tuple(x0.shape[1:]), draws, seed=seed, epoch=epoch, device=device)
    s = sigmas.view(-1, *([1] * (x0.ndim - 1)))
    noisy = (1 - s) * x0 + s * noise
    target = noise - x0

    dropped = caption_dropout_mask(draws, seed=seed, epoch=epoch, p=caption_dropout_p)
    text = _text_inputs(batch, dropped, empty_prompt)
    pred = _predict(transformer, batch, noisy, sigmas, text, image_embed_shape, dtype=dtype, device=device)
    if pred.shape != target.shape:
        raise ValueError(f"model predicted {tuple(pred.shape)} for targets {tuple(target.shape)}")
    per_sample = (pred.float() - target).pow(2).flatten(1).mean(1)
    loss = per_sample.mean()  # = F.mse_loss(pred.float(), target): every sample has the same element count
    stats = {
        "sigmas": sigmas.detach().cpu(),
        "loss_per_sample": per_sample.detach().cpu(),
        "caption_dropped": sum(dropped),
    }
    return loss, stats
