"""LoRA files: the diffusers file loads with load_lora_adapter into a fresh pipeline and reproduces the trained model;
the ComfyUI file has ComfyUI's HunyuanVideo names, and merging it the way ComfyUI does gives the trained model back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hvtune.config.settings import TrainConfig
from hvtune.model.registry import load_transformer, resolve_model
from hvtune.output.comfyui import _comfy_name, to_comfyui
from hvtune.output.export import (
    adapter_config,
    lora_state_dict,
    save_comfyui_lora,
    save_diffusers_lora,
    save_run_lora,
)
from hvtune.run_files import RunFiles
from hvtune.train.lora import add_lora

ALL_MAPPABLE = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "norm1.linear",
    "norm1_context.linear",
    "norm_out.linear",
    "proj_out",
]


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


def _trained_lora(tiny_t2v, rank=4, alpha=8.0, targets=None):
    paths = resolve_model(TrainConfig(pretrained_model_name_or_path=str(tiny_t2v)), ["transformer"], env={})
    transformer = load_transformer(paths)
    torch.manual_seed(0)
    add_lora(transformer, TrainConfig(lora_rank=rank, lora_alpha=alpha, lora_target_modules=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training: non-zero B so the adapter changes the output
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return paths, transformer.eval()  # inference: LoRA dropout (SimpleTuner's default 0.1) off


def test_diffusers_lora_loads_with_load_lora_adapter_and_changes_output(tiny_t2v, tmp_path):
    from diffusers import HunyuanVideo15Pipeline

    _, trained = _trained_lora(tiny_t2v, rank=4, alpha=8.0)  # alpha != rank: the scale must travel with the file
    state = lora_state_dict(trained)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())
    path = save_diffusers_lora(state, tmp_path, {"hvtune.flavour": "t2v-480p"}, adapter_config(trained))
    assert path == tmp_path / "pytorch_lora_weights.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left behind
    saved = load_file(path)
    # the default targets are SimpleTuner's: the dual-stream blocks' and the token refiner's attention
    assert saved and all(
        k.startswith(("transformer.transformer_blocks.", "transformer.context_embedder.")) for k in saved
    )
    assert all(torch.equal(saved[f"transformer.{k}"], v) for k, v in state.items())  # fp32, bit-exact
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["hvtune.rank"] == "4" and meta["hvtune.alpha"] == "8.0" and meta["hvtune.flavour"] == "t2v-480p"
    targets = json.loads(meta["hvtune.target_modules"])
    assert "context_embedder.token_refiner.refiner_blocks.0.attn.to_q" in targets  # SimpleTuner's set:
    assert "transformer_blocks.1.attn.to_add_out" in targets  # the refiner, and the last block's (dead) text modules
    assert json.loads(meta["lora_adapter_metadata"])["transformer.lora_alpha"] == 8.0

    pipe = HunyuanVideo15Pipeline.from_pretrained(tiny_t2v)  # a freshly loaded pipeline, as a user would
    fresh = pipe.transformer
    with torch.no_grad():
        base = fresh(**_inputs(fresh))[0]
        fresh.load_lora_adapter(tmp_path, prefix="transformer", use_safetensors=True)
        loaded = fresh(**_inputs(fresh))[0]
        expected = trained(**_inputs(trained))[0]
    assert not torch.allclose(base, loaded, atol=1e-4)  # the LoRA changes the output
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-4)  # and is the trained one, at alpha / rank


def _merge_comfy(transformer, comfy: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ComfyUI does with the file, expressed back in diffusers names: W += alpha / rank * B @ A on Tencent's fused
    qkv weights (rows q, k, v) and (shift, scale)-ordered final modulation, then split/swapped to diffusers."""
    names = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]
    names = [n.removesuffix(".base_layer") for n in names]
    inverse: dict[str, list[tuple[str, int]]] = {}
    for name in names:
        mapped = _comfy_name(name)
        if mapped:
            inverse.setdefault(mapped[0], []).append((name, mapped[2]))
    state = {k.replace(".base_layer", ""): v.clone() for k, v in transformer.state_dict().items() if "lora_" not in k}
    lora_names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in comfy}
    for full in lora_names:
        name = full.removeprefix("diffusion_model.")
        a, b = comfy[f"{full}.lora_A.weight"], comfy[f"{full}.lora_B.weight"]
        delta = comfy[f"{full}.alpha"].item() / a.shape[0] * b @ a
        members = sorted(inverse[name], key=lambda m: m[1])
        if name == "final_layer.adaLN_modulation.1":
            delta = torch.cat(delta.chunk(2)[::-1])  # Tencent (shift, scale) -> diffusers (scale, shift)
        chunks = delta.chunk(3) if len(members) == 3 else [delta]
        for (module, _), chunk in zip(members, chunks, strict=True):
            state[f"{module}.weight"] += chunk
    return state


@pytest.mark.parametrize(
    "targets",
    [None, ALL_MAPPABLE, ["to_q", "add_v_proj"]],
    ids=["default", "every-mappable-module", "partial-qkv"],
)
def test_comfyui_file_merged_as_comfyui_does_reproduces_the_trained_model(tiny_t2v, tmp_path, targets):
    paths, trained = _trained_lora(tiny_t2v, rank=4, alpha=8.0, targets=targets)
    state = lora_state_dict(trained)
    out = save_comfyui_lora(state, tmp_path / "comfyui_lora.safetensors", alpha=8.0)
    comfy = load_file(out)
    assert set(comfy) == set(to_comfyui(state, alpha=8.0))
    assert all(k.startswith("diffusion_model.") for k in comfy)
    if targets is None:
        expected = {
            f"diffusion_model.double_blocks.{n}.{m}.{s}"
            for n in (0, 1)
            for m in ("img_attn_qkv", "txt_attn_qkv", "img_attn_proj", "txt_attn_proj")
            for s in ("lora_A.weight", "lora_B.weight", "alpha")
        }
        expected |= {
            f"diffusion_model.txt_in.individual_token_refiner.blocks.{i}.{m}.{s}"
            for i in range(trained.config.num_refiner_layers)
            for m in ("self_attn_qkv", "self_attn_proj")
            for s in ("lora_A.weight", "lora_B.weight", "alpha")
        }  # SimpleTuner's default targets: the token refiner's attention and the last block's text projection too
        assert set(comfy) == expected
        # fused: A stacks q, k, v (3r rows), B is block diagonal, alpha 3a keeps alpha / rank
        a, b = (
            comfy["diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight"],
            comfy["diffusion_model.double_blocks.0.img_attn_qkv.lora_B.weight"],
        )
        inner = trained.config.num_attention_heads * trained.config.attention_head_dim
        assert a.shape == (12, inner) and b.shape == (3 * inner, 12)
        assert comfy["diffusion_model.double_blocks.0.img_attn_qkv.alpha"].item() == 24.0
        fused = 24.0 / 12 * b @ a
        separate = [
            2.0
            * state[f"transformer_blocks.0.attn.{m}.lora_B.weight"]
            @ state[f"transformer_blocks.0.attn.{m}.lora_A.weight"]
            for m in ("to_q", "to_k", "to_v")
        ]
        torch.testing.assert_close(fused, torch.cat(separate), atol=1e-6, rtol=1e-5)
    if targets == ALL_MAPPABLE:
        names = {k.rsplit(".", 2)[0] for k in comfy if k.endswith("lora_A.weight")}
        assert {
            "diffusion_model.double_blocks.0.img_mod.linear",
            "diffusion_model.double_blocks.0.txt_mlp.fc2",
            "diffusion_model.txt_in.individual_token_refiner.blocks.0.self_attn_qkv",
            "diffusion_model.txt_in.individual_token_refiner.blocks.0.mlp.fc1",
            "diffusion_model.txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1",
            "diffusion_model.final_layer.linear",
            "diffusion_model.final_layer.adaLN_modulation.1",
        } <= names

    merged = load_transformer(paths)
    merged.load_state_dict(_merge_comfy(trained, comfy))
    with torch.no_grad():
        expected_out = trained(**_inputs(trained))[0]
        merged_out = merged(**_inputs(merged))[0]
        base_out = load_transformer(paths)(**_inputs(merged))[0]
    assert not torch.allclose(base_out, expected_out, atol=1e-4)
    torch.testing.assert_close(merged_out, expected_out, atol=1e-5, rtol=1e-4)


def test_comfyui_export_names_what_it_cannot_map(tiny_t2v):
    _, trained = _trained_lora(tiny_t2v, targets=["context_embedder_2.linear_1"])
    with pytest.raises(ValueError, match=r"context_embedder_2\.linear_1"):
        to_comfyui(lora_state_dict(trained), alpha=4.0)


@pytest.mark.parametrize(("alpha", "written"), [(None, "4"), (8.0, "8.0")])
def test_a_runs_lora_files_carry_its_flavour_rank_and_alpha(tiny_t2v, tmp_path, alpha, written):
    """What training leaves in output_dir: both files, the diffusers one saying the configured rank and alpha (alpha
    = rank when unset) and the flavour, the ComfyUI one scaling each module by alpha / rank."""
    _, trained = _trained_lora(tiny_t2v, rank=4, alpha=alpha)
    cfg = TrainConfig(model_flavour="t2v-480p", lora_rank=4, lora_alpha=alpha)
    files = RunFiles(tmp_path)
    assert save_run_lora(cfg, trained, tmp_path) == files.lora
    with safe_open(files.lora, "pt") as f:
        meta = f.metadata()
    assert (meta["hvtune.flavour"], meta["hvtune.rank"], meta["hvtune.alpha"]) == ("t2v-480p", "4", written)
    comfy = load_file(files.comfyui)
    assert comfy["diffusion_model.double_blocks.0.img_attn_proj.alpha"].item() == float(written)
