"""Flow-matching objective: counter-based randomness and padding trimming that does not change the model's output."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from hvtune.objective import caption_dropout_mask, sample_noise, sample_sigmas, shift_sigmas, training_loss
from hvtune.tiny_model import build_components


def test_same_draw_same_randomness_whatever_the_batch():
    a = sample_noise((2, 3), [5, 9], seed=1, epoch=0)
    b = sample_noise((2, 3), [9, 5, 7], seed=1, epoch=0)
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])
    s1 = sample_sigmas([5, 9], seed=1, epoch=0, shift=5.0)
    s2 = sample_sigmas([9], seed=1, epoch=0, shift=5.0)
    assert s1[1] == s2[0]
    assert not torch.equal(sample_noise((2, 3), [5], seed=2, epoch=0), a[:1])
    assert not torch.equal(sample_noise((2, 3), [5], seed=1, epoch=1), a[:1])


def test_shift_and_sampling_modes():
    assert torch.allclose(shift_sigmas(torch.tensor([0.0, 0.5, 1.0]), 3.0), torch.tensor([0.0, 0.75, 1.0]))
    draws = list(range(2000))
    sig = sample_sigmas(draws, seed=0, epoch=0, shift=1.0, mode="sigmoid")
    uni = sample_sigmas(draws, seed=0, epoch=0, shift=1.0, mode="uniform")
    assert 0.45 < sig.mean() < 0.55 and sig.std() < uni.std()  # logit-normal concentrates around the middle
    assert sample_sigmas(draws, seed=0, epoch=0, shift=5.0).mean() > sig.mean()  # shift pushes towards noise


def test_caption_dropout_rate():
    mask = caption_dropout_mask(list(range(4000)), seed=0, epoch=0, p=0.25)
    assert 0.22 < sum(mask) / len(mask) < 0.28
    assert caption_dropout_mask([1, 2], seed=0, epoch=0, p=0.0) == [False, False]


def _batch(text_len: int, pad_to: int, text_2_len: int = 3, pad_2_to: int = 3):
    g = torch.Generator().manual_seed(0)
    embeds = torch.zeros(1, pad_to, 32)
    embeds[:, :text_len] = torch.randn(1, text_len, 32, generator=g)
    mask = torch.zeros(1, pad_to, dtype=torch.long)
    mask[:, :text_len] = 1
    embeds_2 = torch.zeros(1, pad_2_to, 32)
    embeds_2[:, :text_2_len] = torch.randn(1, text_2_len, 32, generator=g)
    mask_2 = torch.zeros(1, pad_2_to, dtype=torch.long)
    mask_2[:, :text_2_len] = 1
    latents = torch.randn(1, 32, 2, 4, 6, generator=g)
    return SimpleNamespace(
        latents=latents,
        cond_latents=torch.zeros_like(latents),
        cond_mask=torch.zeros(1, 1, 2, 4, 6),
        image_embeds=None,
        prompt_embeds=embeds,
        prompt_mask=mask,
        prompt_embeds_2=embeds_2,
        prompt_mask_2=mask_2,
        draws=[3],
        sample_indices=[0],
    )


def test_trimmed_text_padding_gives_the_pipelines_loss():
    """The pipeline pads Qwen text to 1000 tokens and ByT5 to 256; training trims to the longest valid length.
    The masks make the padding invisible, so the loss is the same: trimming is safe."""
    transformer = build_components("t2v")["transformer"].eval()
    kw = dict(seed=0, epoch=0, shift=5.0, image_embed_shape=(729, 16))
    with torch.no_grad():
        trimmed, _ = training_loss(transformer, _batch(12, 12, 3, 3), **kw)
        padded, _ = training_loss(transformer, _batch(12, 1000, 3, 256), **kw)
    torch.testing.assert_close(trimmed, padded, atol=1e-5, rtol=1e-5)


def test_caption_dropout_uses_the_empty_prompt():
    transformer = build_components("t2v")["transformer"].eval()
    batch = _batch(12, 12)
    empty = (
        torch.zeros(1, 1, 32),
        torch.ones(1, 1, dtype=torch.long),
        torch.zeros(1, 1, 32),
        torch.zeros(1, 1, dtype=torch.long),
    )
    kw = dict(seed=0, epoch=0, shift=5.0, image_embed_shape=(729, 16), empty_prompt=empty)
    with torch.no_grad():
        kept, stats_kept = training_loss(transformer, batch, caption_dropout_p=0.0, **kw)
        dropped, stats = training_loss(transformer, batch, caption_dropout_p=1.0, **kw)
        empty_batch = _batch(12, 12)
        empty_batch.prompt_embeds, empty_batch.prompt_mask = empty[0], empty[1]
        empty_batch.prompt_embeds_2, empty_batch.prompt_mask_2 = empty[2], empty[3]
        reference, _ = training_loss(transformer, empty_batch, **kw)
    assert stats["caption_dropped"] == 1 and stats_kept["caption_dropped"] == 0
    assert not torch.allclose(kept, dropped)
    torch.testing.assert_close(dropped, reference)
