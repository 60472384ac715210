"""lora_type: lycoris (LoKr, LoHa) through peft with LyCORIS' rules: the config file as SimpleTuner reads it, the
ComfyUI file applied the way ComfyUI's LyCORIS weight adapters apply it gives the trained model back, and the
diffusers-format file loads into a fresh transformer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hvtune.config.lycoris import LycorisSpec, read_lycoris_config
from hvtune.config.schema import TrainConfig
from hvtune.config.settings import load_config
from hvtune.errors import ConfigError
from hvtune.model.registry import load_transformer, resolve_model
from hvtune.output.comfyui import _comfy_name
from hvtune.output.export import (
    adapter_config,
    adapter_scales,
    load_lycoris,
    lora_state_dict,
    save_comfyui_lora,
    save_diffusers_lora,
)
from hvtune.train.lora import add_lycoris
from test_export import _inputs

# SimpleTuner 4.10.1's own simpletuner/examples/lycoris_config.json (the file its docs point at)
SIMPLETUNER_EXAMPLE = {
    "algo": "lokr",
    "multiplier": 1.0,
    "full_matrix": True,
    "linear_alpha": 1,
    "factor": 16,
    "apply_preset": {
        "target_module": ["Attention", "FeedForward"],
        "module_algo_map": {"Attention": {"factor": 16}, "FeedForward": {"factor": 8}},
    },
}
PRESET = {"target_module": ["Attention", "FeedForward"]}
SPECS = {
    "lokr-full-simpletuner-example": SIMPLETUNER_EXAMPLE,
    "lokr-split-halves": {
        "algo": "lokr",
        "linear_dim": 2,
        "linear_alpha": 3,
        "factor": 4,
        "decompose_both": True,
        "apply_preset": PRESET,
    },
    "loha": {"algo": "loha", "linear_dim": 3, "linear_alpha": 6, "apply_preset": PRESET},
}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "lycoris_config.json"
    path.write_text(json.dumps(data))
    return path


def test_simpletuner_example_reads_with_its_meaning(tmp_path):
    spec = read_lycoris_config(_write(tmp_path, SIMPLETUNER_EXAMPLE))
    assert (spec.algo, spec.dim, spec.alpha, spec.full_matrix) == ("lokr", 4, 1.0, True)  # linear_dim default 4
    assert spec.factor_for("Attention") == 16 and spec.factor_for("FeedForward") == 8
    assert LycorisSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"algo": "glora"}, "algo 'glora'"),
        ({"use_scalar": True}, "use_scalar"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"apply_preset": {"target_module": ["Attention"], "exclude_name": ["x"]}}, "exclude_name"),
        ({"apply_preset": {}}, "target_module"),
    ],
)
def test_what_hvtune_cannot_train_as_asked_is_refused_naming_the_key(tmp_path, change, named):
    path = _write(tmp_path, {**SIMPLETUNER_EXAMPLE, **change})
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"lora_type": "lycoris", "lycoris_config": str(path), "instance_data_dir": "."}))
    with pytest.raises(ConfigError) as e:
        load_config(config, env={}, check_paths=False)
    assert "lycoris_config" in str(e.value) and named in str(e.value)


def test_block_swap_runs_as_group_offload_announced_and_ramtorch_is_refused_with_the_equivalent_setting(tmp_path):
    argv = ["--instance_data_dir=.", "--musubi_blocks_to_swap=14", "--ramtorch=true"]
    with pytest.raises(ConfigError) as e:
        load_config(None, env={}, argv=argv, check_paths=False)
    text = str(e.value)
    assert "musubi_blocks_to_swap" not in text  # group offload dominates block swap (docs/PERFORMANCE.md)
    assert "ramtorch" in text and "leaf_level" in text
    resolved = load_config(None, env={}, argv=argv[:2], check_paths=False)
    t = resolved.train
    assert (t.enable_group_offload, t.group_offload_type, t.group_offload_blocks_per_group) == (True, "block_level", 1)
    assert any("musubi_blocks_to_swap 14: runs as enable_group_offload: true" in n for n in resolved.notices)


def _trained(tiny_t2v, tmp_path, data):
    paths = resolve_model(TrainConfig(pretrained_model_name_or_path=str(tiny_t2v)), ["transformer"], env={})
    transformer = load_transformer(paths)
    torch.manual_seed(0)
    add_lycoris(transformer, read_lycoris_config(_write(tmp_path, data)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training: every factor non-zero so the adapter changes the output
        for name, p in transformer.named_parameters():
            if "lokr_" in name or "hada_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return paths, transformer


def _comfyui_delta(comfy: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """ComfyUI's weight adapters (comfy/weight_adapter/lokr.py, loha.py, and the `diff` patch), written out."""
    w = {k.removeprefix(f"{name}."): v.float() for k, v in comfy.items() if k.rsplit(".", 1)[0] == name}
    alpha = w["alpha"].item() if "alpha" in w else None
    if "diff" in w:
        return w["diff"]
    if "hada_w1_a" in w:
        dim = w["hada_w1_b"].shape[0]
        scale = alpha / dim if alpha is not None else 1.0
        return (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]) * scale
    dim = None
    if "lokr_w1" in w:
        w1 = w["lokr_w1"]
    else:
        dim = w["lokr_w1_b"].shape[0]
        w1 = w["lokr_w1_a"] @ w["lokr_w1_b"]
    if "lokr_w2" in w:
        w2 = w["lokr_w2"]
    else:
        dim = w["lokr_w2_b"].shape[0]
        w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return torch.kron(w1, w2) * scale


@pytest.mark.parametrize("data", list(SPECS.values()), ids=list(SPECS))
def test_comfyui_file_applied_as_comfyui_does_equals_peft_merged_weights(tiny_t2v, tmp_path, data):
    from peft.tuners.lycoris_utils import LycorisLayer

    _, trained = _trained(tiny_t2v, tmp_path, data)
    state = lora_state_dict(trained)
    comfy = load_file(save_comfyui_lora(state, tmp_path / "comfy.safetensors", 1.0, scales=adapter_scales(trained)))
    suffixes = {k.rsplit(".", 1)[1] for k in comfy}
    expected = {
        "lokr-full-simpletuner-example": {"lokr_w1", "lokr_w2", "diff"},  # full halves; fused q/k/v as a diff
        "lokr-split-halves": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    }[next(k for k, v in SPECS.items() if v is data)]
    assert expected <= suffixes <= {
        "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b",
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha", "diff",
    }  # fmt: skip
    layers = {n: m for n, m in trained.named_modules() if isinstance(m, LycorisLayer)}
    inverse: dict[str, list[tuple[int, str]]] = {}
    for module in layers:
        name, group, position = _comfy_name(module)
        inverse.setdefault(f"diffusion_model.{name}", []).append((position, module, group is not None))
    assert {k.rsplit(".", 1)[0] for k in comfy} == set(inverse)
    for comfy_name, members in inverse.items():
        delta = _comfyui_delta(comfy, comfy_name)
        chunks = delta.chunk(3) if members[0][2] else [delta]  # fused q, k, v rows (a missing member is zero)
        for position, module, _ in members:
            chunk = chunks[position]
            with torch.no_grad():
                merged = layers[module].get_delta_weight("default")  # peft's own delta for its merged weight
            tol = dict(atol=2e-3, rtol=1e-2) if f"{comfy_name}.diff" in comfy else dict(atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(chunk, merged.float(), **tol)
    if data is SPECS["loha"]:  # LoHa fuses q/k/v exactly, no full-weight diff
        assert not any(k.endswith(".diff") for k in comfy)


@pytest.mark.parametrize("data", list(SPECS.values()), ids=list(SPECS))
def test_diffusers_format_file_loads_into_a_fresh_transformer(tiny_t2v, tmp_path, data):
    paths, trained = _trained(tiny_t2v, tmp_path, data)
    spec = read_lycoris_config(tmp_path / "lycoris_config.json")
    meta = {"hvtune.lora_type": "lycoris", "hvtune.config.lycoris": spec.to_json()}
    path = save_diffusers_lora(lora_state_dict(trained), tmp_path / "out", meta, adapter_config(trained))
    fresh = load_transformer(paths)
    with torch.no_grad():
        base = fresh(**_inputs(fresh))[0]
        load_lycoris(fresh, path)
        loaded = fresh(**_inputs(fresh))[0]
        expected = trained(**_inputs(trained))[0]
    assert not torch.allclose(base, expected, atol=1e-4)
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_lycoris_trains_exports_and_resumes_byte_for_byte_with_ema(demo_project, tmp_path):
    from hvtune.trainer import train

    config = _write(tmp_path, SIMPLETUNER_EXAMPLE)

    def run(out, **extra):
        argv = [f"--output_dir={out}", "--max_train_steps=4", "--validation_disable=true", "--lora_type=lycoris",
                f"--lycoris_config={config}", "--learning_rate=1e-3", "--use_ema=true",
                *(f"--{k}={v}" for k, v in extra.items())]  # fmt: skip
        return load_config(demo_project, env={}, argv=argv)

    full, part = tmp_path / "full", tmp_path / "part"
    train(run(full))
    saved = load_file(full / "pytorch_lora_weights.safetensors")
    assert saved and all(".lokr_w" in k for k in saved)
    assert any(k.endswith(".lokr_w2") and v.abs().sum() > 0 for k, v in saved.items())  # w2 starts at 0: it trained
    comfy = load_file(full / "comfyui_lora.safetensors")
    assert any(k.startswith("diffusion_model.double_blocks.0.img_mlp.fc1.lokr_w") for k in comfy)
    assert train(run(part), max_steps_this_run=2).stopped_early
    train(run(part, resume_from_checkpoint="latest"))
    for name in (
        "pytorch_lora_weights.safetensors",
        "ema/pytorch_lora_weights.safetensors",
        "comfyui_lora.safetensors",
    ):
        assert (full / name).read_bytes() == (part / name).read_bytes(), name


def test_lycoris_config_defaults_to_simpletuners_path_beside_the_config(tmp_path):
    (tmp_path / "config").mkdir()
    _write(tmp_path / "config", SIMPLETUNER_EXAMPLE)
    config = tmp_path / "config" / "config.json"
    config.write_text(json.dumps({"lora_type": "lycoris", "instance_data_dir": "."}))
    resolved = load_config(config, env={}, check_paths=False)
    assert Path(resolved.train.lycoris_config) == tmp_path / "config" / "lycoris_config.json"
