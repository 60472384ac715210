"""What docs/LORA_FORMATS.md says about the files' sizes and loaders, checked: the full-size rank-16 files' sizes from
the real architecture (meta tensors: shapes only, no weights), and which LyCORIS files diffusers' own
`load_lora_adapter` loads (on the tiny model)."""

from __future__ import annotations

import warnings
from collections import defaultdict

import pytest
import torch

import test_lycoris as lycoris
from hvtune.config.lycoris import read_lycoris_config
from hvtune.config.schema import TrainConfig
from hvtune.model.registry import load_transformer
from hvtune.output.comfyui import _KEY, _comfy_name
from hvtune.output.export import adapter_config, lora_state_dict, save_diffusers_lora


def full_size_lora_bytes(rank: int, targets: str | None = None) -> tuple[int, int]:
    """(diffusers file, ComfyUI file) weight bytes of a float32 LoRA on the default targets of the full model.
    ComfyUI's fused q/k/v: lora_A stacks the three (3r x in), lora_B is block-diagonal (3 out x 3r), one alpha."""
    from accelerate import init_empty_weights
    from diffusers import HunyuanVideo15Transformer3DModel
    from peft.utils import get_peft_model_state_dict

    from hvtune.model.architectures import TRANSFORMER_CONFIG
    from hvtune.train.lora import add_lora

    with init_empty_weights():
        transformer = HunyuanVideo15Transformer3DModel(**TRANSFORMER_CONFIG)
    extra = {} if targets is None else {"lora_target_modules": targets}
    add_lora(transformer, TrainConfig(lora_rank=rank, **extra))
    state = get_peft_model_state_dict(transformer)
    shapes: dict[str, dict[str, tuple[int, ...]]] = defaultdict(dict)
    for key, tensor in state.items():
        module, half = _KEY.match(key).groups()
        shapes[module][half] = tuple(tensor.shape)
    names: dict[str, list[dict]] = defaultdict(list)
    for module, halves in shapes.items():
        names[_comfy_name(module)[0]].append(halves)
    comfy = 0
    for name, members in names.items():
        (r, width), out = members[0]["A"], members[0]["B"][0]
        n = 3 if name.endswith("qkv") else 1  # a member not trained is a zero block: the same size
        comfy += 4 * (n * r * width + n * out * n * r) + 4
    return 4 * sum(t.numel() for t in state.values()), comfy


def test_full_size_rank_16_files_are_about_115_and_202_mb():
    diffusers, comfy = full_size_lora_bytes(16)
    assert round(diffusers / 1e6) == 115 and round(comfy / 1e6) == 202, (diffusers, comfy)


def test_full_size_rank_16_main_blocks_files_are_about_113_and_198_mb():
    diffusers, comfy = full_size_lora_bytes(16, targets="main_blocks")
    assert round(diffusers / 1e6) == 113 and round(comfy / 1e6) == 198, (diffusers, comfy)


@pytest.mark.parametrize(
    ("spec", "loads"),
    [("lokr-split-halves", True), ("lokr-full-simpletuner-example", False), ("loha", False)],
)
def test_diffusers_load_lora_adapter_builds_lokr_adapters_with_split_halves(tiny_t2v, tmp_path, spec, loads):
    paths, trained = lycoris._trained(tiny_t2v, tmp_path, lycoris.SPECS[spec])
    config = read_lycoris_config(tmp_path / "lycoris_config.json")
    meta = {"hvtune.lora_type": "lycoris", "hvtune.config.lycoris": config.to_json()}
    path = save_diffusers_lora(lora_state_dict(trained), tmp_path / "out", meta, adapter_config(trained))
    fresh = load_transformer(paths)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not loads:  # SimpleTuner's full-matrix LoKr: shape mismatch; LoHa: "LoraConfig could not be instantiated"
            with pytest.raises((RuntimeError, TypeError)):
                fresh.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="transformer")
            return
        fresh.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="transformer")
        loaded = fresh(**lycoris._inputs(fresh))[0]
        expected = trained(**lycoris._inputs(trained))[0]
    assert any("lokr_w1" in name for name, _ in fresh.named_parameters())
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-4)
