"""Memory options do something real, and give the same numbers as the plain model where they should."""

from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import pytest
import torch

from hvtune.config.schema import TrainConfig
from hvtune.errors import UserError
from hvtune.testing.tiny_model import build_components
from hvtune.train.base_model import prepare_base
from hvtune.train.lora import add_lora, dead_modules
from hvtune.train.objective import training_loss
from hvtune.train.optim import build_lr_scheduler, build_optimizer

IMAGE_SHAPE = (729, 16)


@functools.cache
def _tiny_transformer():
    return build_components("t2v")["transformer"]


def _fresh():
    """A new copy of the tiny t2v transformer (building the whole tiny pipeline each time is slow)."""
    return copy.deepcopy(_tiny_transformer())


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
    base = {
        "base_model_precision": "no_change",
        "mixed_precision": "no",
        "lora_dropout": 0.0,
    }  # an fp32 base, no dropout
    cfg = TrainConfig(**{**base, "lora_init_type": "gaussian", **cfg})
    transformer = _fresh()
    prepare_base(transformer, cfg, "cpu")
    torch.manual_seed(0)
    add_lora(transformer, cfg)
    return transformer, cfg


def _randomize_lora_b(transformer):
    """B starts at zero (so A's first gradient is zero); a trained-looking B makes every gradient informative."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _loss_and_grads(transformer):
    loss, _ = training_loss(transformer, _batch(), seed=0, epoch=0, shift=5.0, image_embed_shape=IMAGE_SHAPE)
    loss.backward()
    grads = {n: p.grad for n, p in transformer.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_every_lora_parameter_gets_a_gradient_and_base_is_frozen():
    """The main_blocks preset (hvtune's earlier default; the simpletuner default: tests/test_simpletuner_parity.py)."""
    transformer, _ = _model(gradient_checkpointing=False, lora_target_modules="main_blocks")
    _randomize_lora_b(transformer)
    _, grads = _loss_and_grads(transformer)
    lora = [n for n, _ in transformer.named_parameters() if "lora_" in n]
    assert sorted(grads) == sorted(lora)  # exactly the LoRA weights train
    # every adapter takes part, so DDP needs no find_unused_parameters
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [
        n for n, g in grads.items() if g is None or not g.abs().sum() > 0
    ]
    assert all(p.dtype == torch.float32 for n, p in transformer.named_parameters() if "lora_" in n)
    adapted = {n.rsplit(".lora_", 1)[0] for n in lora}
    last = transformer.config.num_layers - 1
    assert not any(n.startswith("context_embedder") for n in adapted)  # main blocks only, not the token refiner
    assert f"transformer_blocks.{last}.attn.to_q" in adapted and "transformer_blocks.0.attn.to_add_out" in adapted
    assert f"transformer_blocks.{last}.attn.to_add_out" not in adapted
    assert len(adapted) == 8 * transformer.config.num_layers - 2
    ignored = set(transformer._ddp_params_and_buffers_to_ignore)  # DDP syncs the LoRA weights only
    assert ignored == {n for n, p in transformer.named_parameters() if not p.requires_grad} | {
        n for n, _ in transformer.named_buffers()
    }


def test_the_last_blocks_text_modules_are_dead_in_the_model():
    """Why add_lora leaves them out: with LoRA forced onto them, the last block's to_add_out and ff_context get no
    gradient at all and add_q_proj only zeros, because the model drops the text stream after the last block."""
    from peft import LoraConfig

    transformer = _fresh()
    transformer.requires_grad_(False)
    torch.manual_seed(0)
    transformer.add_adapter(
        LoraConfig(
            r=2,
            init_lora_weights="gaussian",
            target_modules=r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)"
            r"|ff_context\.net\.(0\.proj|2))",
        )
    )
    _randomize_lora_b(transformer)
    _, grads = _loss_and_grads(transformer)
    dead = tuple(dead_modules(transformer))
    for name, grad in grads.items():
        if name.startswith(dead):
            assert grad is None or not grad.any(), name
        else:
            assert grad is not None and grad.any(), name
    assert any(g is None for n, g in grads.items() if n.startswith(dead))


def test_user_target_list_also_skips_the_dead_modules():
    transformer, _ = _model(gradient_checkpointing=False, lora_target_modules=["to_add_out", "proj_out"])
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in transformer.named_parameters() if "lora_" in n}
    assert adapted == {"transformer_blocks.0.attn.to_add_out", "proj_out"}
    with pytest.raises(UserError, match="match no layer"):
        _model(lora_target_modules=["no_such_layer"])


def test_precision_and_checkpointing_flags_take_effect():
    bf16, _ = _model(base_model_precision="bf16", gradient_checkpointing=True)
    assert bf16.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == torch.bfloat16
    assert bf16.proj_out.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in bf16.named_parameters() if "lora_" in n)
    assert all(not p.requires_grad for n, p in bf16.named_parameters() if "lora_" not in n)
    assert bf16.gradient_checkpointing
    plain, _ = _model(gradient_checkpointing=False, mixed_precision="no")
    assert plain.proj_out.weight.dtype == torch.float32 and not plain.gradient_checkpointing
    # SimpleTuner's default no_change follows mixed_precision (cmd_args.py model_is_bf16): bf16, not fp32
    following, _ = _model(base_model_precision="no_change", mixed_precision="bf16")
    assert following.proj_out.weight.dtype == torch.bfloat16
    loss, _ = training_loss(bf16, _batch(), seed=0, epoch=0, shift=5.0, image_embed_shape=IMAGE_SHAPE)
    loss.backward()  # bf16 base + fp32 LoRA runs forward and backward
    assert torch.isfinite(loss)
    with pytest.raises(RuntimeError, match="before add_lora"):
        prepare_base(plain, TrainConfig(), "cpu")


@pytest.mark.parametrize("offload", ["block_level", "leaf_level"])
def test_group_offload_and_checkpointing_match_the_plain_model(offload):
    plain, _ = _model(gradient_checkpointing=False)
    _randomize_lora_b(plain)
    ref_loss, ref_grads = _loss_and_grads(plain)
    model, _ = _model(
        gradient_checkpointing=True,
        enable_group_offload=True,
        group_offload_type=offload,
        group_offload_blocks_per_group=1,
    )
    _randomize_lora_b(model)
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    hooks = [m._diffusers_hook.get_hook(_GROUP_OFFLOADING) for m in model.modules() if hasattr(m, "_diffusers_hook")]
    groups = {id(h.group): h.group for h in hooks if h is not None}.values()
    assert groups  # offload hooks are really installed
    # every frozen base tensor is in an offload group and no LoRA weight is: LoRA stays resident on the GPU
    offloaded = {id(p) for g in groups for p in g.parameters}
    assert all(not g.modules for g in groups)
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert all(id(p) in offloaded for p in base) and not any(id(p) in offloaded for p in lora)
    calls = []
    for g in groups:
        g.onload_ = (lambda f: lambda: (calls.append(1), f())[1])(g.onload_)
    loss, grads = _loss_and_grads(model)
    assert calls  # groups were really loaded while the model ran
    torch.testing.assert_close(loss, ref_loss)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5)


def test_offload_options_that_cannot_work_are_refused():
    with pytest.raises(UserError, match="CUDA"):
        _model(enable_group_offload=True, group_offload_use_stream=True)
    with pytest.raises(UserError, match="enable_group_offload"):
        _model(enable_group_offload=True, enable_model_cpu_offload=True)


def test_int8_torchao_base_trains():
    cfg = TrainConfig(base_model_precision="int8-torchao", gradient_checkpointing=False, lora_init_type="gaussian")
    transformer = _fresh()
    prepare_base(transformer, cfg, "cpu")
    torch.manual_seed(0)
    add_lora(transformer, cfg)
    weight = transformer.transformer_blocks[0].attn.to_q.base_layer.weight
    assert "Int8" in type(weight).__name__ or "Affine" in type(weight).__name__  # really quantized
    assert all(p.dtype == torch.float32 for n, p in transformer.named_parameters() if "lora_" in n)
    params = [p for p in transformer.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = build_optimizer(params, cfg)
    loss, _ = training_loss(transformer, _batch(), seed=0, epoch=0, shift=5.0, image_embed_shape=IMAGE_SHAPE)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))


@pytest.mark.parametrize("name", ["adamw", "adamw_bf16", "adamw8bit"])
def test_optimizers_step(name):
    transformer, _ = _model(gradient_checkpointing=False)
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = build_optimizer(params, TrainConfig(optimizer=name))
    assert type(opt).__name__ == ("AdamW8bit" if name == "adamw8bit" else "AdamW")
    before = [p.detach().clone() for p in params]
    _loss_and_grads(transformer)
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))
    assert all(p.dtype == torch.float32 for p in params)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("constant", [0.0, 0.5, 1.0, 1.0]),  # SimpleTuner runs constant with a warmup as constant_with_warmup
        ("constant_with_warmup", [0.0, 0.5, 1.0, 1.0]),
        ("linear", [0.0, 0.5, 1.0, 0.5]),
        ("polynomial", [0.0, 0.5, 1.0, 0.5**0.8]),  # lr_end 4e-7, lr_power 0.8 (SimpleTuner's defaults)
        # SimpleTuner's Cosine/Sine/CosineAnnealingHardRestarts: period lr_warmup_steps, no warmup, floor lr_end
        ("cosine", [1.0, 0.5, 4e-7, 1.0]),
        ("sine", [0.5, 1.0, 0.5, 0.5]),
        ("cosine_with_restarts", [1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_lr_schedulers_with_warmup(name, expected):
    """lr at optimizer steps 0, 1, 2, 4 of 6 with 2 warmup steps, as SimpleTuner 4.10.1 computes them."""
    param = torch.nn.Parameter(torch.zeros(1))
    cfg = TrainConfig(lr_scheduler=name, lr_warmup_steps=2, learning_rate=1.0)
    opt = build_optimizer([param], cfg)
    sched = build_lr_scheduler(opt, cfg, total_steps=6)
    lrs = []
    for _ in range(5):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert [lrs[0], lrs[1], lrs[2], lrs[4]] == pytest.approx(expected, abs=1e-6)


def test_constant_without_warmup_is_constant():
    param = torch.nn.Parameter(torch.zeros(1))
    cfg = TrainConfig(lr_scheduler="constant", lr_warmup_steps=0, learning_rate=0.5)
    opt = build_optimizer([param], cfg)
    sched = build_lr_scheduler(opt, cfg, total_steps=3)
    lrs = []
    for _ in range(3):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == [0.5, 0.5, 0.5]
