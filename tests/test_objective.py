"""Flow-matching objective: counter-based randomness, the inputs the model gets, and text trimming that does not change
the model's output."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from hvtune.testing.tiny_model import build_components
from hvtune.train.objective import (
    TimestepSampling,
    caption_dropout_mask,
    counter_generator,
    sample_noise,
    sample_sigmas,
    shift_sigmas,
    training_loss,
)

IMAGE_SHAPE = (729, 16)  # the tiny model's SigLIP width


@pytest.fixture(scope="module")
def t2v():
    return build_components("t2v")["transformer"].eval()


@pytest.fixture(scope="module")
def i2v():
    return build_components("i2v")["transformer"].eval()


def test_counter_generator_is_stable_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a = torch.randn(4, generator=counter_generator(1, 2, 3, purpose="noise"))
    b = torch.randn(4, generator=counter_generator(1, 2, 3, purpose="noise"))
    assert torch.equal(a, b)
    assert not torch.equal(a, torch.randn(4, generator=counter_generator(1, 2, 3, purpose="timestep")))
    assert not torch.equal(a, torch.randn(4, generator=counter_generator(1, 2, 4, purpose="noise")))
    assert torch.equal(torch.get_rng_state(), state)


def test_same_draw_same_randomness_whatever_the_batch():
    """World-size independence: a sample's noise and sigma depend on (seed, epoch, draw) only, not on which other
    samples share its batch, their order, or the process that draws it."""
    a = sample_noise((2, 3), [5, 9], seed=1, epoch=0)
    b = sample_noise((2, 3), [9, 5, 7], seed=1, epoch=0)
    assert a.dtype == torch.float32
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])
    s1 = sample_sigmas([5, 9], seed=1, epoch=0, shift=5.0)
    s2 = sample_sigmas([9], seed=1, epoch=0, shift=5.0)
    assert s1[1] == s2[0]
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(sample_noise((2, 3), [5, 9], seed=1, epoch=0), a)
    assert not torch.equal(sample_noise((2, 3), [5], seed=2, epoch=0), a[:1])  # another seed
    assert not torch.equal(sample_noise((2, 3), [5], seed=1, epoch=1), a[:1])  # another epoch
    assert not torch.equal(sample_sigmas([5], seed=2, epoch=0, shift=5.0), s1[:1])


def test_shift_formula_and_sampling_modes():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    k = 3.0
    torch.testing.assert_close(shift_sigmas(s, k), k * s / (1 + (k - 1) * s))
    torch.testing.assert_close(shift_sigmas(torch.tensor([0.5]), 3.0), torch.tensor([0.75]))
    torch.testing.assert_close(shift_sigmas(s, 1.0), s)  # shift 1 is the identity
    draws = list(range(2000))
    sig = sample_sigmas(draws, seed=0, epoch=0, shift=1.0, sampling=TimestepSampling("sigmoid"))
    uni = sample_sigmas(draws, seed=0, epoch=0, shift=1.0, sampling=TimestepSampling("uniform"))
    assert 0.45 < sig.mean() < 0.55 and sig.std() < uni.std()  # logit-normal concentrates around the middle
    assert 0.45 < uni.mean() < 0.55 and 0.27 < uni.std() < 0.31  # U(0, 1): std 0.289
    shifted = sample_sigmas(draws, seed=0, epoch=0, shift=5.0)
    torch.testing.assert_close(shifted, shift_sigmas(sig, 5.0))  # same draws, then shifted
    assert shifted.mean() > sig.mean()  # shift > 1 pushes towards noise
    with pytest.raises(ValueError, match="timestep_sampling"):
        sample_sigmas([0], seed=0, epoch=0, shift=1.0, sampling=TimestepSampling("lognormal"))


def test_caption_dropout_rate():
    mask = caption_dropout_mask(list(range(4000)), seed=0, epoch=0, p=0.25)
    assert 0.22 < sum(mask) / len(mask) < 0.28
    assert caption_dropout_mask([1, 2], seed=0, epoch=0, p=0.0) == [False, False]
    assert caption_dropout_mask([1, 2], seed=0, epoch=0, p=1.0) == [True, True]
    assert (
        caption_dropout_mask([7, 3], seed=0, epoch=0, p=0.5)
        == caption_dropout_mask([3, 7], seed=0, epoch=0, p=0.5)[::-1]
    )


def _text(length: int, pad_to: int, dim: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    embeds = torch.zeros(1, pad_to, dim)
    embeds[:, :length] = torch.randn(1, length, dim, generator=g)
    mask = torch.zeros(1, pad_to, dtype=torch.long)
    mask[:, :length] = 1
    return embeds, mask


def _batch(text_len=12, pad_to=12, text_2_len=3, pad_2_to=3, seed=0, draw=3, i2v=False):
    g = torch.Generator().manual_seed(seed)
    embeds, mask = _text(text_len, pad_to, 32, g)
    embeds_2, mask_2 = _text(text_2_len, pad_2_to, 32, g)
    latents = torch.randn(1, 32, 2, 4, 6, generator=g)
    cond, cond_mask = torch.zeros_like(latents), torch.zeros(1, 1, 2, 4, 6)
    image = None
    if i2v:
        cond[:, :, 0], cond_mask[:, :, 0] = latents[:, :, 0], 1.0
        image = torch.randn(1, *IMAGE_SHAPE, generator=g)
    return SimpleNamespace(
        latents=latents,
        cond_latents=cond,
        cond_mask=cond_mask,
        image_embeds=image,
        prompt_embeds=embeds,
        prompt_mask=mask,
        prompt_embeds_2=embeds_2,
        prompt_mask_2=mask_2,
        draws=[draw],
        sample_indices=[seed],
    )


def _cat(batches):
    """Samples of different caption lengths in one batch, right-padded to the longest (as batches.py does)."""

    def pad(x, length):
        return torch.cat([x, x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))], 1)

    out = {}
    for key in ("prompt_embeds", "prompt_mask", "prompt_embeds_2", "prompt_mask_2"):
        length = max(b.__dict__[key].shape[1] for b in batches)
        out[key] = torch.cat([pad(b.__dict__[key], length) for b in batches])
    for key in ("latents", "cond_latents", "cond_mask"):
        out[key] = torch.cat([b.__dict__[key] for b in batches])
    images = [b.image_embeds for b in batches]
    out["image_embeds"] = None if images[0] is None else torch.cat(images)
    out["draws"] = [d for b in batches for d in b.draws]
    out["sample_indices"] = [i for b in batches for i in b.sample_indices]
    return SimpleNamespace(**out)


class _Recorder(torch.nn.Module):
    """Wraps the transformer and keeps its inputs and output."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    @property
    def config(self):
        return self.model.config

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        self.calls.append((kwargs, out[0]))
        return out


def test_model_inputs_follow_the_flow_matching_recipe(t2v):
    """x_t = (1 - s) x0 + s noise, 65 channels = [x_t, condition, mask], timestep s * 1000, t2v image zeros, and the
    loss is the float32 MSE against noise - x0."""
    batch = _cat([_batch(seed=0, draw=3), _batch(seed=1, draw=8)])
    model = _Recorder(t2v)
    with torch.no_grad():
        loss, stats = training_loss(model, batch, seed=7, epoch=2, shift=3.0, image_embed_shape=IMAGE_SHAPE)
    kwargs, pred = model.calls[0]
    sigmas = sample_sigmas([3, 8], seed=7, epoch=2, shift=3.0)
    noise = sample_noise((32, 2, 4, 6), [3, 8], seed=7, epoch=2)
    s = sigmas.view(-1, 1, 1, 1, 1)
    hidden = kwargs["hidden_states"]
    assert hidden.shape == (2, 65, 2, 4, 6) and t2v.config.in_channels == 65
    torch.testing.assert_close(hidden[:, :32], (1 - s) * batch.latents + s * noise)
    assert not hidden[:, 32:].any()  # t2v: condition latents and mask are zeros
    torch.testing.assert_close(kwargs["timestep"], sigmas * 1000)
    assert kwargs["image_embeds"].shape == (2, *IMAGE_SHAPE) and not kwargs["image_embeds"].any()
    assert torch.equal(kwargs["encoder_attention_mask"], batch.prompt_mask)
    assert torch.equal(kwargs["encoder_hidden_states_2"], batch.prompt_embeds_2)
    target = noise - batch.latents
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred.float(), target))
    torch.testing.assert_close(stats["sigmas"], sigmas)
    assert loss.dtype == torch.float32 and stats["loss_per_sample"].shape == (2,)


def test_i2v_inputs_carry_condition_and_image_embeddings(i2v):
    model = _Recorder(i2v)
    batch = _batch(i2v=True)
    with torch.no_grad():
        training_loss(model, batch, seed=0, epoch=0, shift=5.0, image_embed_shape=IMAGE_SHAPE)
    kwargs, _ = model.calls[0]
    torch.testing.assert_close(kwargs["hidden_states"][:, 32:64], batch.cond_latents)
    torch.testing.assert_close(kwargs["hidden_states"][:, 64:], batch.cond_mask)
    torch.testing.assert_close(kwargs["image_embeds"], batch.image_embeds)


def test_bad_batches_are_refused_naming_the_samples(t2v):
    batch = _batch(i2v=True)
    batch.image_embeds = torch.zeros_like(batch.image_embeds)  # would silently turn the batch into t2v
    with pytest.raises(ValueError, match=r"samples \[0\].*all-zero image"):
        training_loss(t2v, batch, seed=0, epoch=0, shift=5.0, image_embed_shape=IMAGE_SHAPE)
    batch = _batch()
    batch.latents = batch.latents[:, :16]
    batch.cond_latents = batch.cond_latents[:, :16]
    with pytest.raises(ValueError, match="latent channels"):
        training_loss(t2v, batch, seed=0, epoch=0, shift=5.0, image_embed_shape=IMAGE_SHAPE)
    with pytest.raises(ValueError, match="empty prompt"):
        training_loss(t2v, _batch(), seed=0, epoch=0, shift=5.0, caption_dropout_p=1.0, image_embed_shape=IMAGE_SHAPE)


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_trimmed_text_padding_gives_the_pipelines_output(task, t2v, i2v):
    """The pipeline pads Qwen text to 1000 tokens and ByT5 to 256; training trims to the longest valid length.
    The masks make the padding invisible, so the model's prediction is the same: trimming is safe."""
    model = _Recorder(t2v if task == "t2v" else i2v)
    kw = dict(seed=0, epoch=0, shift=5.0, image_embed_shape=IMAGE_SHAPE)
    with torch.no_grad():
        trimmed, _ = training_loss(model, _batch(12, 12, 3, 3, i2v=task == "i2v"), **kw)
        padded, _ = training_loss(model, _batch(12, 1000, 3, 256, i2v=task == "i2v"), **kw)
    torch.testing.assert_close(model.calls[0][1], model.calls[1][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trimmed, padded, atol=1e-6, rtol=1e-5)


def test_batch_composition_does_not_change_a_samples_loss(t2v):
    """Two samples of different caption lengths in one batch (padded to the longer) give each sample the loss it
    gets alone: what a process computes for a sample does not depend on the world size or the other samples."""
    kw = dict(seed=0, epoch=0, shift=5.0, image_embed_shape=IMAGE_SHAPE)
    a, b = _batch(5, 5, 0, 1, seed=0, draw=3), _batch(12, 12, 3, 3, seed=1, draw=8)
    with torch.no_grad():
        alone = [training_loss(t2v, x, **kw)[1]["loss_per_sample"] for x in (a, b)]
        together = training_loss(t2v, _cat([b, a]), **kw)[1]["loss_per_sample"]
    torch.testing.assert_close(together, torch.cat(alone[::-1]), atol=1e-6, rtol=1e-5)


def test_caption_dropout_uses_the_empty_prompt(t2v):
    batch = _batch(12, 12)
    empty = (
        torch.zeros(1, 1, 32),
        torch.ones(1, 1, dtype=torch.long),
        torch.zeros(1, 1, 32),
        torch.zeros(1, 1, dtype=torch.long),
    )
    kw = dict(seed=0, epoch=0, shift=5.0, image_embed_shape=IMAGE_SHAPE, empty_prompt=empty)
    with torch.no_grad():
        kept, stats_kept = training_loss(t2v, batch, caption_dropout_p=0.0, **kw)
        dropped, stats = training_loss(t2v, batch, caption_dropout_p=1.0, **kw)
        empty_batch = _batch(12, 12)
        empty_batch.prompt_embeds, empty_batch.prompt_mask = empty[0], empty[1]
        empty_batch.prompt_embeds_2, empty_batch.prompt_mask_2 = empty[2], empty[3]
        reference, _ = training_loss(t2v, empty_batch, **kw)
    assert stats["caption_dropped"] == 1 and stats_kept["caption_dropped"] == 0
    assert not torch.allclose(kept, dropped)
    torch.testing.assert_close(dropped, reference)


def test_loss_goes_down_with_adamw_on_a_fixed_batch(t2v):
    """The objective is trainable: 20 AdamW steps of LoRA on one batch (same draws, so the same noise and timestep
    every step) lower its loss."""
    from hvtune.config.settings import TrainConfig
    from hvtune.train.base_model import prepare_base
    from hvtune.train.lora import add_lora
    from hvtune.train.optim import build_optimizer

    cfg = TrainConfig(
        base_model_precision="no_change",
        gradient_checkpointing=False,
        lora_rank=4,
        learning_rate=1e-2,
        lora_target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_out"],
    )
    transformer = copy.deepcopy(t2v).train()
    prepare_base(transformer, cfg, "cpu")
    torch.manual_seed(0)
    add_lora(transformer, cfg)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    batch = _cat([_batch(seed=0, draw=3), _batch(seed=1, draw=8)])
    losses = []
    for _ in range(20):
        loss, _ = training_loss(transformer, batch, seed=0, epoch=0, shift=3.0, image_embed_shape=IMAGE_SHAPE)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
