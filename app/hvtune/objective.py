"""The training objective: flow matching on the HunyuanVideo 1.5 transformer, with counter-based randomness.

x_t = (1 - s) x0 + s * noise, target = noise - x0, plain MSE, model timestep s * 1000 (BRIEF section 1).
Timesteps: s = sigmoid(N(0, 1)) ("sigmoid", the logit-normal used by Tencent's and SimpleTuner's trainers) or
U(0, 1) ("uniform"), then shifted s' = k s / (1 + (k - 1) s) with k = flow_schedule_shift.

Every random number (noise, timestep, caption dropout) is drawn on the CPU from a generator seeded by a hash of
(seed, epoch, draw, purpose), where `draw` is the sample's position in the epoch's global plan (batches.plan_epoch).
Nothing reads the global RNG, so a sample gets the same noise on any device, process count, batch composition or
resume point.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def counter_seed(seed: int, *counters: int | str, purpose: str) -> int:
    text = ":".join(str(c) for c in ("hvtune", purpose, seed, *counters))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def counter_generator(seed: int, *counters: int | str, purpose: str) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(counter_seed(seed, *counters, purpose=purpose))


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(draws: list[int], *, seed: int, epoch: int, shift: float, mode: str = "sigmoid") -> torch.Tensor:
    values = []
    for draw in draws:
        g = counter_generator(seed, epoch, draw, purpose="timestep")
        if mode == "sigmoid":
            values.append(torch.sigmoid(torch.randn((), generator=g)))
        elif mode == "uniform":
            values.append(torch.rand((), generator=g))
        else:
            raise ValueError(f"unknown timestep sampling {mode!r}")
    return shift_sigmas(torch.stack(values), shift)


def sample_noise(shape: tuple[int, ...], draws: list[int], *, seed: int, epoch: int) -> torch.Tensor:
    """(len(draws), *shape) float32 noise on the CPU, each row from its own draw's generator."""
    return torch.stack(
        [torch.randn(shape, generator=counter_generator(seed, epoch, d, purpose="noise")) for d in draws]
    )


def caption_dropout_mask(draws: list[int], *, seed: int, epoch: int, p: float) -> list[bool]:
    if p <= 0:
        return [False] * len(draws)
    return [
        torch.rand((), generator=counter_generator(seed, epoch, d, purpose="caption_dropout")).item() < p for d in draws
    ]


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[1] == length:
        return x
    pad = torch.zeros((x.shape[0], length - x.shape[1], *x.shape[2:]), dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], dim=1)


def _text_inputs(batch, dropped: list[bool], empty) -> tuple[torch.Tensor, ...]:
    """The batch's text, with dropped captions replaced by the empty prompt, padded to the longest valid length."""
    embeds, mask, embeds_2, mask_2 = batch.prompt_embeds, batch.prompt_mask, batch.prompt_embeds_2, batch.prompt_mask_2
    if not any(dropped):
        return embeds, mask, embeds_2, mask_2
    e, m, e2, m2 = empty
    length = max(embeds.shape[1], e.shape[1])
    length_2 = max(embeds_2.shape[1], e2.shape[1])
    embeds, mask, embeds_2, mask_2 = (
        _pad_to(embeds, length).clone(),
        _pad_to(mask, length).clone(),
        _pad_to(embeds_2, length_2).clone(),
        _pad_to(mask_2, length_2).clone(),
    )
    for i, drop in enumerate(dropped):
        if drop:
            embeds[i], mask[i] = _pad_to(e, length)[0], _pad_to(m, length)[0]
            embeds_2[i], mask_2[i] = _pad_to(e2, length_2)[0], _pad_to(m2, length_2)[0]
    # after replacement the longest valid length may be shorter again
    keep = max(int(mask.sum(1).max()), 1)
    keep_2 = max(int(mask_2.sum(1).max()), 1)
    return embeds[:, :keep], mask[:, :keep], embeds_2[:, :keep_2], mask_2[:, :keep_2]


def training_loss(
    transformer,
    batch,
    *,
    seed: int,
    epoch: int,
    shift: float,
    mode: str = "sigmoid",
    caption_dropout_p: float = 0.0,
    empty_prompt=None,
    image_embed_shape: tuple[int, int] = (729, 1152),
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, dict[str, Any]]:
    floating = [p for p in transformer.parameters() if p.dtype.is_floating_point]
    dtype = next((p.dtype for p in floating if not p.requires_grad), floating[0].dtype)  # the frozen base's dtype
    x0 = batch.latents.to(device, torch.float32)
    draws = batch.draws
    sigmas = sample_sigmas(draws, seed=seed, epoch=epoch, shift=shift, mode=mode).to(device)
    noise = sample_noise(tuple(x0.shape[1:]), draws, seed=seed, epoch=epoch).to(device)
    s = sigmas.view(-1, *([1] * (x0.ndim - 1)))
    noisy = (1 - s) * x0 + s * noise
    target = noise - x0

    dropped = caption_dropout_mask(draws, seed=seed, epoch=epoch, p=caption_dropout_p)
    embeds, mask, embeds_2, mask_2 = _text_inputs(batch, dropped, empty_prompt)
    if batch.image_embeds is None:  # t2v: the model detects t2v by all-zero image embeddings
        image_embeds = torch.zeros((x0.shape[0], *image_embed_shape), device=device, dtype=dtype)
    else:
        image_embeds = batch.image_embeds.to(device, dtype)
    hidden = torch.cat([noisy, batch.cond_latents.to(device), batch.cond_mask.to(device)], dim=1)
    pred = transformer(
        hidden_states=hidden.to(dtype),
        timestep=(sigmas * 1000).to(dtype),
        encoder_hidden_states=embeds.to(device, dtype),
        encoder_attention_mask=mask.to(device),
        encoder_hidden_states_2=embeds_2.to(device, dtype),
        encoder_attention_mask_2=mask_2.to(device),
        image_embeds=image_embeds,
        return_dict=False,
    )[0]
    loss = torch.nn.functional.mse_loss(pred.float(), target)
    return loss, {"sigmas": sigmas.detach().cpu(), "caption_dropped": sum(dropped)}
