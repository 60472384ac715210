"""The trainer's side of the cache: the epoch plan (which samples form each global batch) and batch loading.

Epoch plan. Every sample appears `repeats + 1` times per epoch (SimpleTuner: "a value of 0 means no repeats";
dataset_length + repeats * dataset_length draws). Draws are grouped by bucket (W, H, F); each bucket's draws are
shuffled, cut into global batches of `global_batch_size`, and the incomplete remainder of each bucket is dropped
(`EpochPlan.dropped` says how many per bucket); then the batch order is shuffled. The only randomness is one CPU
`torch.Generator` seeded from sha256(seed, epoch) - never the global RNG - so the plan is the same on every machine,
for any world size (each process takes its slice of every global batch) and after a resume.

A draw is the position of a sample in the epoch's flattened plan (batch * global_batch_size + slot); the training step
keys per-sample randomness on (seed, epoch, draw). A sample with several captions uses caption `draw % n`.

Batches read only cache entries. Text is padded to the longest valid length in the batch, not to the pipeline's
1000 / 256 tokens. A batch whose captions quote no text gets zero ByT5 tokens (L2 = 0, which the model accepts), so a
batch of one sample, or of equal-length captions, has no padding at all and attention runs without a mask
(`hvtune.model.attention`). Qwen keeps at least one token: the token refiner mean-pools it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hvtune.cache.store import read_entry

if TYPE_CHECKING:
    import torch

    from hvtune.cache.manifest import Manifest


@dataclass
class Batch:
    latents: torch.Tensor  # (B, 32, F, H, W)
    cond_latents: torch.Tensor  # (B, 32, F, H, W): zeros for t2v; i2v: first-frame latent in frame 0
    cond_mask: torch.Tensor  # (B, 1, F, H, W): zeros for t2v; ones on latent frame 0 for i2v
    image_embeds: torch.Tensor | None  # (B, N, Dv) for i2v, None for t2v
    prompt_embeds: torch.Tensor  # (B, L, D), L = longest valid length in this batch
    prompt_mask: torch.Tensor  # (B, L) int64, 1 = valid
    prompt_embeds_2: torch.Tensor  # (B, L2, D2), L2 >= 0
    prompt_mask_2: torch.Tensor  # (B, L2) int64
    sample_indices: list[int]
    draws: list[int]


class EpochPlan(list):
    """list[list[(sample_index, draw)]] of global batches, plus `dropped`: bucket -> draws left out this epoch."""

    dropped: dict[tuple[int, int, int], int]


def _plan_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"hvtune-plan:{seed}:{epoch}".encode()).digest()[:8], "big") >> 1


def plan_epoch(manifest: Manifest, *, global_batch_size: int, seed: int, epoch: int) -> EpochPlan:
    import torch

    if global_batch_size < 1:
        raise ValueError("global_batch_size must be >= 1")
    groups: dict[tuple[int, int, int], list[int]] = {}
    for s in manifest.samples:
        groups.setdefault(tuple(s.bucket), []).extend([s.index] * (s.repeats + 1))
    generator = torch.Generator().manual_seed(_plan_seed(seed, epoch))
    batches: list[list[int]] = []
    dropped: dict[tuple[int, int, int], int] = {}
    for bucket in sorted(groups):
        draws = groups[bucket]
        order = torch.randperm(len(draws), generator=generator).tolist()
        shuffled = [draws[i] for i in order]
        full = len(shuffled) // global_batch_size
        dropped[bucket] = len(shuffled) - full * global_batch_size
        batches += [shuffled[b * global_batch_size : (b + 1) * global_batch_size] for b in range(full)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    plan = EpochPlan(
        [(index, b * global_batch_size + slot) for slot, index in enumerate(batches[o])] for b, o in enumerate(order)
    )
    plan.dropped = dropped
    return plan


def _pad_text(embeds: list[torch.Tensor], min_length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid-token tensors (L_i, D) -> (B, L, D) zero-padded to the longest, and the (B, L) int64 mask."""
    import torch

    length = max([min_length, *(e.shape[0] for e in embeds)])
    dim = embeds[0].shape[1]
    out = torch.zeros((len(embeds), length, dim), dtype=torch.float32)
    mask = torch.zeros((len(embeds), length), dtype=torch.int64)
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e.float()
        mask[i, : e.shape[0]] = 1
    return out, mask


def _texts(manifest: Manifest, keys: list[str]):
    entries = [read_entry(manifest.text_path(k), manifest.repair_hint) for k in keys]
    embeds, mask = _pad_text([e["prompt_embeds"] for e in entries], 1)
    embeds_2, mask_2 = _pad_text([e["prompt_embeds_2"] for e in entries])
    return embeds, mask, embeds_2, mask_2


def text_entry(manifest: Manifest, key: str):
    """(embeds (1, L, D), mask (1, L), embeds_2 (1, L2, D2), mask_2 (1, L2)) of one cached prompt; L2 >= 0."""
    return _texts(manifest, [key])


def load_batch(manifest: Manifest, items: list[tuple[int, int]]) -> Batch:
    import torch

    if not items:
        raise ValueError("a batch needs at least one item")
    samples = [manifest.samples[i] for i, _ in items]
    buckets = {tuple(s.bucket) for s in samples}
    if len(buckets) != 1:
        raise ValueError(f"a batch mixes buckets {sorted(buckets)}")
    entries = [read_entry(manifest.latent_path(s), manifest.repair_hint) for s in samples]
    latents = torch.stack([e["latents"].float() for e in entries])
    cond = torch.zeros_like(latents)
    mask = torch.zeros((latents.shape[0], 1, *latents.shape[2:]), dtype=latents.dtype)
    image_embeds = None
    if manifest.task == "i2v":
        for i, e in enumerate(entries):
            cond[i, :, 0] = e["cond_latents"][:, 0].float()
        mask[:, :, 0] = 1.0
        image_embeds = torch.stack(
            [read_entry(manifest.image_path(s), manifest.repair_hint)["image_embeds"].float() for s in samples]
        )
    keys = [s.text_keys[draw % len(s.text_keys)] for s, (_, draw) in zip(samples, items, strict=True)]
    embeds, text_mask, embeds_2, text_mask_2 = _texts(manifest, keys)
    return Batch(
        latents=latents,
        cond_latents=cond,
        cond_mask=mask,
        image_embeds=image_embeds,
        prompt_embeds=embeds,
        prompt_mask=text_mask,
        prompt_embeds_2=embeds_2,
        prompt_mask_2=text_mask_2,
        sample_indices=[i for i, _ in items],
        draws=[d for _, d in items],
    )
