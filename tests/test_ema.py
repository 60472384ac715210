"""EMA of the LoRA weights (`use_ema`): SimpleTuner's decay rule, export beside the LoRA, validation, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hvtune.config.settings import load_config
from hvtune.train.ema import LoraEMA
from hvtune.trainer import train


def _cfg(**overrides):
    return load_config(
        None, env={}, argv=["--instance_data_dir=.", *(f"--{k}={v}" for k, v in overrides.items())], check_paths=False
    ).train


class _Lora(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lora_A = torch.nn.Parameter(torch.zeros(3))
        self.frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)


def test_decay_follows_simpletuners_rule_and_interval():
    """SimpleTuner (helpers/training/ema.py get_decay with its global_step): step 1 copies the weights, then
    decay = min((1 + s) / (10 + s), ema_decay) with s = global_step - 1; updates only every ema_update_interval."""
    model = _Lora()
    ema = LoraEMA(model, _cfg(use_ema="true", ema_decay=0.5, ema_update_interval=2))
    expected = torch.zeros(3)
    for step in range(1, 9):
        model.lora_A.data.fill_(float(step))
        updated = ema.update(step)
        assert updated == (step % 2 == 0)
        if updated:
            s = step - 1
            decay = 0.0 if s <= 0 else min((1 + s) / (10 + s), 0.5)
            expected = decay * expected + (1 - decay) * step
        with ema.applied():
            assert torch.allclose(model.lora_A.detach(), expected)
        assert torch.equal(model.lora_A.detach(), torch.full((3,), float(step)))  # trained weights are back
    assert ema.names == ["lora_A"]  # frozen weights are not averaged


def test_defaults_are_simpletuners():
    cfg = _cfg()
    assert (cfg.use_ema, cfg.ema_decay, cfg.ema_update_interval, cfg.ema_validation) == (False, 0.995, 1, "comparison")


@pytest.mark.slow
def test_ema_lora_exported_validated_and_resumed_byte_for_byte(demo_project, tmp_path):
    def run(out, **extra):
        argv = [
            f"--output_dir={out}",
            "--max_train_steps=6",
            "--use_ema=true",
            "--ema_decay=0.9",
            *(f"--{k}={v}" for k, v in extra.items()),
        ]
        return load_config(demo_project, env={}, argv=argv)

    full = tmp_path / "full"
    train(run(full, validation_steps=6, validation_num_inference_steps=2))
    trained = load_file(full / "pytorch_lora_weights.safetensors")
    averaged = load_file(full / "ema" / "pytorch_lora_weights.safetensors")
    assert trained.keys() == averaged.keys()
    assert any(not torch.equal(trained[k], averaged[k]) for k in trained)  # a different, averaged LoRA
    assert (full / "ema" / "comfyui_lora.safetensors").stat().st_size > 0
    record = json.loads((full / "run.json").read_text())
    assert record["outputs"]["ema_lora"] == str(full / "ema" / "pytorch_lora_weights.safetensors")
    videos = sorted(p.name for p in (full / "validation" / "step_000006").iterdir())
    assert videos == ["validation_0.mp4", "validation_0_ema.mp4"]  # ema_validation: comparison (the default)

    part = tmp_path / "part"
    first = train(run(part, validation_disable="true"), max_steps_this_run=4)
    assert first.stopped_early and (part / "checkpoints" / "checkpoint-000004" / "ema.safetensors").is_file()
    train(run(part, validation_disable="true", resume_from_checkpoint="latest"))
    for name in ("pytorch_lora_weights.safetensors", "ema/pytorch_lora_weights.safetensors"):
        assert (full / name).read_bytes() == (part / name).read_bytes(), name
