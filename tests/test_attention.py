"""The blocks' attention path on real cached batches: SDPA gets no mask when nothing is padded, and the layout the
trainer feeds (trimmed text, no ByT5 or image padding, mask-free attention) predicts what the pipeline's padded layout
(Qwen 1000, ByT5 256, 729 image tokens, stock attention) predicts."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from hvtune.cache.manifest import load_manifest
from hvtune.config.schema import TrainConfig
from hvtune.config.settings import load_config
from hvtune.model.registry import load_transformer, resolve_model
from hvtune.train.base_model import prepare_base
from hvtune.train.batches import load_batch, plan_epoch
from hvtune.train.objective import training_loss


def _setup(config_path):
    resolved = load_config(config_path, env={})
    manifest = load_manifest(resolved)
    stock = load_transformer(resolve_model(resolved.train, ["transformer"])).eval()
    ours = copy.deepcopy(stock)
    prepare_base(
        ours, TrainConfig(base_model_precision="no_change", mixed_precision="no", gradient_checkpointing=False), "cpu"
    )
    return manifest, stock, ours


@pytest.fixture(scope="module")
def t2v(demo_project):
    return _setup(demo_project)


@pytest.fixture(scope="module")
def i2v(demo_project_i2v):
    return _setup(demo_project_i2v)


def _record_sdpa(monkeypatch) -> list:
    """The attn_mask of every F.scaled_dot_product_attention call: None, or (shape, all True)."""
    calls, original = [], torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        calls.append(None if mask is None else (tuple(mask.shape), bool(mask.all())))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls


def _pipeline_layout(batch):
    """The batch padded the way HunyuanVideo15Pipeline pads: Qwen to 1000, ByT5 to 256 tokens."""

    def pad(x, length):
        return torch.cat([x, x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))], 1)

    return SimpleNamespace(
        **{
            **vars(batch),
            "prompt_embeds": pad(batch.prompt_embeds, 1000),
            "prompt_mask": pad(batch.prompt_mask, 1000),
            "prompt_embeds_2": pad(batch.prompt_embeds_2, 256),
            "prompt_mask_2": pad(batch.prompt_mask_2, 256),
        }
    )


def _loss(model, batch, image_tokens: int):
    with torch.no_grad():
        kw = dict(seed=0, epoch=0, shift=5.0, image_embed_shape=(image_tokens, model.config.image_embed_dim))
        return training_loss(model, batch, **kw)[1]["loss_per_sample"]


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_a_batch_without_padding_reaches_sdpa_without_a_mask_and_predicts_like_the_pipeline(task, request, monkeypatch):
    manifest, stock, ours = request.getfixturevalue(task)
    batch = load_batch(manifest, plan_epoch(manifest, global_batch_size=1, seed=0, epoch=0)[0])
    assert batch.prompt_embeds_2.shape[1] == 0  # the demo captions quote no text: no ByT5 token at all
    blocks = len(ours.transformer_blocks)

    calls = _record_sdpa(monkeypatch)
    fast = _loss(ours, batch, image_tokens=0)
    assert calls[-blocks:] == [None] * blocks  # every dual-stream block ran SDPA with attn_mask=None

    calls.clear()
    reference = _loss(stock, _pipeline_layout(batch), image_tokens=729)
    masks = calls[-blocks:]
    assert all(m is not None and not m[1] for m in masks)  # the pipeline's layout: a dense mask with padding
    torch.testing.assert_close(fast, reference, atol=1e-6, rtol=1e-5)


def test_a_batch_with_padding_gets_a_key_mask_and_each_samples_loss(t2v, monkeypatch):
    """Captions of different lengths in one batch leave padding: SDPA gets a (B, 1, 1, S) key mask, not the stock
    (B, 1, S, S) one, and every sample gets the loss it gets alone (what a process computes does not depend on its
    batch mates)."""
    manifest, _, ours = t2v
    plan = plan_epoch(manifest, global_batch_size=1, seed=0, epoch=0)
    lengths = {}
    for items in plan:
        lengths.setdefault(int(load_batch(manifest, items).prompt_mask.sum()), items)
    assert len(lengths) >= 2, "the demo captions should differ in length"
    short, long = (lengths[k] for k in sorted(lengths)[:2])
    alone = torch.cat([_loss(ours, load_batch(manifest, items), 0) for items in (short, long)])

    calls = _record_sdpa(monkeypatch)
    together = _loss(ours, load_batch(manifest, short + long), 0)
    blocks = len(ours.transformer_blocks)
    masks = calls[-blocks:]
    assert all(m is not None and len(m[0]) == 4 and m[0][:3] == (2, 1, 1) and not m[1] for m in masks), masks
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)

    calls.clear()  # the stock processor on the same batch: a dense mask, and the same losses
    _, stock, _ = t2v
    assert torch.allclose(_loss(stock, load_batch(manifest, short + long), 0), together, atol=1e-6, rtol=1e-5)
    dense = calls[-blocks:]
    assert all(m[0][:2] == (2, 1) and m[0][2] == m[0][3] > 1 for m in dense), dense


def test_whether_anything_is_padded_is_asked_once_per_forward_not_once_per_block(t2v, monkeypatch):
    """Each question is a host sync; the model hands every block the same mask tensor, so one per forward suffices."""
    from hvtune.model import attention

    manifest, _, ours = t2v
    asked, original = [], attention._LastAnswer.all_valid_for.__func__

    def counting(cls, token_mask):
        if cls.ref is None or cls.ref() is not token_mask or cls.version != token_mask._version:
            asked.append(tuple(token_mask.shape))
        return original(cls, token_mask)

    monkeypatch.setattr(attention._LastAnswer, "all_valid_for", classmethod(counting))
    assert len(ours.transformer_blocks) >= 2
    for items in plan_epoch(manifest, global_batch_size=1, seed=0, epoch=0)[:2]:
        _loss(ours, load_batch(manifest, items), 0)
    assert len(asked) == 2  # two forwards, one question each
