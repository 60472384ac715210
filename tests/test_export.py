"""LoRA files: the diffusers file loads with load_lora_adapter and changes the output; ComfyUI names are fused."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hvtune.config import TrainConfig
from hvtune.export import adapter_config, lora_state_dict, save_comfyui_lora, save_diffusers_lora, to_comfyui
from hvtune.memory import add_lora
from hvtune.registry import load_transformer, resolve_model


def _inputs(transformer):
    g = torch.Generator().manual_seed(0)
    c = transformer.config
    return dict(
        hidden_states=torch.randn(1, c.in_channels, 2, 4, 6, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 7, c.text_embed_dim, generator=g),
        encoder_attention_mask=torch.ones(1, 7, dtype=torch.long),
        encoder_hidden_states_2=torch.randn(1, 3, c.text_embed_2_dim, generator=g),
        encoder_attention_mask_2=torch.ones(1, 3, dtype=torch.long),
        image_embeds=torch.zeros(1, 729, c.image_embed_dim),
        return_dict=False,
    )


def _trained_lora(tiny_t2v, rank=4, alpha=8.0):
    paths = resolve_model(TrainConfig(pretrained_model_name_or_path=str(tiny_t2v)), ["transformer"], env={})
    transformer = load_transformer(paths)
    torch.manual_seed(0)
    add_lora(transformer, TrainConfig(lora_rank=rank, lora_alpha=alpha))
    with torch.no_grad():  # stand-in for training: non-zero B so the adapter changes the output
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    return paths, transformer


def test_diffusers_lora_loads_with_load_lora_adapter_and_changes_output(tiny_t2v, tmp_path):
    paths, trained = _trained_lora(tiny_t2v)
    state = lora_state_dict(trained)
    path = save_diffusers_lora(state, tmp_path, {"hvtune.rank": "4"}, adapter_config(trained))
    keys = list(load_file(path))
    assert path.name == "pytorch_lora_weights.safetensors"
    assert keys and all(k.startswith("transformer.transformer_blocks.") for k in keys)
    assert not any("token_refiner" in k for k in keys)
    with safe_open(path, "pt") as f:
        assert f.metadata()["hvtune.rank"] == "4"

    fresh = load_transformer(paths)
    with torch.no_grad():
        base = fresh(**_inputs(fresh))[0]
        fresh.load_lora_adapter(tmp_path, prefix="transformer", use_safetensors=True)
        loaded = fresh(**_inputs(fresh))[0]
        expected = trained(**_inputs(trained))[0]
    assert not torch.allclose(base, loaded, atol=1e-4)  # the LoRA changes the output
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-4)  # and is the trained one


def test_last_block_to_add_out_is_not_targeted(tiny_t2v):
    _, trained = _trained_lora(tiny_t2v)
    last = trained.config.num_layers - 1
    names = [n for n, _ in trained.named_parameters() if "lora_A" in n]
    assert any(f"transformer_blocks.{last}.attn.to_q" in n for n in names)
    assert not any(f"transformer_blocks.{last}.attn.to_add_out" in n for n in names)
    assert any("transformer_blocks.0.attn.to_add_out" in n for n in names)


def test_comfyui_names_and_fused_qkv_equal_separate_deltas(tiny_t2v, tmp_path):
    _, trained = _trained_lora(tiny_t2v, rank=4, alpha=8.0)
    state = lora_state_dict(trained)
    comfy = to_comfyui(state, alpha=8.0)
    assert set(comfy) >= {
        "diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight",
        "diffusion_model.double_blocks.0.img_attn_qkv.alpha",
        "diffusion_model.double_blocks.0.txt_attn_qkv.lora_B.weight",
        "diffusion_model.double_blocks.0.img_attn_proj.lora_A.weight",
        "diffusion_model.double_blocks.0.txt_attn_proj.lora_B.weight",
    }
    assert all(k.startswith("diffusion_model.double_blocks.") for k in comfy)
    # ComfyUI applies alpha / rank * (B @ A) to the fused weight; it must equal the stacked separate deltas.
    a, b = (
        comfy["diffusion_model.double_blocks.1.img_attn_qkv.lora_A.weight"],
        comfy["diffusion_model.double_blocks.1.img_attn_qkv.lora_B.weight"],
    )
    scale = comfy["diffusion_model.double_blocks.1.img_attn_qkv.alpha"].item() / a.shape[0]
    fused_delta = scale * b @ a
    separate = [
        (8.0 / 4)
        * state[f"transformer_blocks.1.attn.{m}.lora_B.weight"]
        @ state[f"transformer_blocks.1.attn.{m}.lora_A.weight"]
        for m in ("to_q", "to_k", "to_v")
    ]
    torch.testing.assert_close(fused_delta, torch.cat(separate), atol=1e-6, rtol=1e-5)
    out = save_comfyui_lora(state, tmp_path / "comfy.safetensors", alpha=8.0)
    assert set(load_file(out)) == set(comfy)
