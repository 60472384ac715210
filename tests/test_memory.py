"""Memory options do something real, and give the same numbers as the plain model where they should."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hvtune.config import TrainConfig, UserError
from hvtune.memory import add_lora, build_lr_scheduler, build_optimizer, prepare_base
from hvtune.objective import training_loss
from hvtune.tiny_model import build_components


def _batch():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 32, 2, 4, 6, generator=g)
    return SimpleNamespace(
        latents=latents,
        cond_latents=torch.zeros_like(latents),
        cond_mask=torch.zeros(2, 1, 2, 4, 6),
        image_embeds=None,
        prompt_embeds=torch.randn(2, 5, 32, generator=g),
        prompt_mask=torch.ones(2, 5, dtype=torch.long),
        prompt_embeds_2=torch.randn(2, 2, 32, generator=g),
        prompt_mask_2=torch.ones(2, 2, dtype=torch.long),
        draws=[0, 1],
        sample_indices=[0, 1],
    )


def _model(**cfg):
    cfg = TrainConfig(base_model_precision="no_change", lora_init_type="gaussian", **cfg)
    transformer = build_components("t2v")["transformer"]
    prepare_base(transformer, cfg, "cpu")
    torch.manual_seed(0)
    add_lora(transformer, cfg)
    return transformer, cfg


def _loss_and_grads(transformer):
    loss, _ = training_loss(transformer, _batch(), seed=0, epoch=0, shift=5.0, image_embed_shape=(729, 16))
    loss.backward()
    grads = {n: p.grad for n, p in transformer.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_every_lora_parameter_gets_a_gradient_and_base_is_frozen():
    transformer, _ = _model(gradient_checkpointing=False)
    _, grads = _loss_and_grads(transformer)
    assert grads and all("lora_" in n for n in grads)
    # every adapter takes part (DDP needs no find_unused_parameters); B starts at zero, so B carries the first signal
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert all(p.dtype == torch.float32 for n, p in transformer.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("offload", ["block_level", "leaf_level"])
def test_group_offload_and_checkpointing_match_the_plain_model(offload):
    plain, _ = _model(gradient_checkpointing=False)
    ref_loss, ref_grads = _loss_and_grads(plain)
    model, _ = _model(gradient_checkpointing=True, enable_group_offload=True, group_offload_type=offload)
    assert any(hasattr(m, "_diffusers_hook") for m in model.modules())  # offload hooks are really installed
    loss, grads = _loss_and_grads(model)
    torch.testing.assert_close(loss, ref_loss)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5)


def test_stream_offload_refused_off_cuda():
    with pytest.raises(UserError, match="CUDA"):
        _model(enable_group_offload=True, group_offload_use_stream=True)


def test_int8_torchao_base_trains():
    cfg = TrainConfig(base_model_precision="int8-torchao", gradient_checkpointing=False, lora_init_type="gaussian")
    transformer = build_components("t2v")["transformer"]
    prepare_base(transformer, cfg, "cpu")
    add_lora(transformer, cfg)
    weight = transformer.transformer_blocks[0].attn.to_q.base_layer.weight
    assert "Int8" in type(weight).__name__ or "Affine" in type(weight).__name__  # really quantized
    params = [p for p in transformer.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = build_optimizer(params, cfg)
    loss, _ = training_loss(transformer, _batch(), seed=0, epoch=0, shift=5.0, image_embed_shape=(729, 16))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))


def test_adamw8bit_steps():
    transformer, _ = _model(gradient_checkpointing=False)
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = build_optimizer(params, TrainConfig(optimizer="adamw8bit"))
    assert type(opt).__name__ == "AdamW8bit"
    before = [p.detach().clone() for p in params]
    _loss_and_grads(transformer)
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))


@pytest.mark.parametrize(
    ("name", "expected"),
    [("constant", [1.0, 1.0, 1.0]), ("linear", [0.5, 1.0, 0.5]), ("cosine", [0.5, 1.0, 0.5])],
)
def test_lr_schedulers_with_warmup(name, expected):
    param = torch.nn.Parameter(torch.zeros(1))
    cfg = TrainConfig(lr_scheduler=name if name != "constant" else "constant", lr_warmup_steps=2, learning_rate=1.0)
    opt = build_optimizer([param], cfg)
    sched = build_lr_scheduler(opt, cfg, total_steps=6)
    lrs = []
    for _ in range(5):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    got = [lrs[1], lrs[2], lrs[4]]
    if name == "constant":  # plain constant ignores warmup
        assert got == expected
    else:
        assert got[0] == pytest.approx(expected[0]) and got[1] == pytest.approx(expected[1])
        assert got[2] == pytest.approx(expected[2], abs=0.01)
