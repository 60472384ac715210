"""A run never dies after training: the validation decode's tiling, dtype and out-of-memory retries, the LoRA safe
before the final validation, and the cache's VAE encode retried tiled."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo15

from hvtune.cli import main
from hvtune.config.settings import load_config
from hvtune.trainer import train

pytestmark = pytest.mark.slow


def resolved(config: Path, out: Path, **overrides):
    argv = [f"--output_dir={out}", *(f"--{k}={v}" for k, v in overrides.items())]
    return load_config(config, env={}, argv=argv)


def _out_of_memory_when(condition):
    """AutoencoderKLHunyuanVideo15.decode raising torch.OutOfMemoryError (what torch raises on CUDA) when
    `condition(vae)` holds; the calls are recorded as (tiled, dtype)."""
    original = AutoencoderKLHunyuanVideo15.decode
    calls = []

    def decode(self, *args, **kwargs):
        calls.append((self.use_tiling, self.dtype))
        if condition(self):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 71.00 GiB (injected)")
        return original(self, *args, **kwargs)

    return decode, calls


RUN = dict(max_train_steps=6, validation_steps=3, checkpointing_steps=100, vae_enable_tiling="false")


def test_out_of_memory_at_the_decode_keeps_the_step_retries_tiled_and_the_lora_is_identical(
    demo_project, tmp_path, monkeypatch, capsys
):
    calm = tmp_path / "calm"
    train(resolved(demo_project, calm, **RUN))
    decode, calls = _out_of_memory_when(lambda vae: not vae.use_tiling)
    monkeypatch.setattr(AutoencoderKLHunyuanVideo15, "decode", decode)
    hit = tmp_path / "hit"
    result = train(resolved(demo_project, hit, **RUN))
    assert result.global_step == 6 and not result.stopped_early
    assert calls == [(False, torch.float32), (True, torch.float32)] * 2  # each round: untiled, then tiled
    # the step of the intermediate round (no checkpoint due) was kept before the retry; the last step always is
    assert sorted(p.name for p in (hit / "checkpoints").iterdir()) == ["checkpoint-000003", "checkpoint-000006"]
    assert sorted(p.relative_to(hit).as_posix() for p in (hit / "validation").rglob("*.mp4")) == [
        "validation/step_000003/validation_0.mp4",
        "validation/step_000006/validation_0.mp4",
    ]
    line = "validation step 3 validation_0.mp4: out of GPU memory decoding untiled float32; decoded tiled float32"
    assert line in capsys.readouterr().out
    status = json.loads((hit / "status.json").read_text())
    assert status["state"] == "finished" and line in status["validation_notes"]
    monkeypatch.undo()
    assert main(["compare", str(calm), str(hit), "--plot", str(tmp_path / "loss.png")]) == 0  # identical


def test_a_video_that_never_fits_is_skipped_with_one_line_and_the_run_finishes(
    demo_project, tmp_path, monkeypatch, capsys
):
    decode, calls = _out_of_memory_when(lambda vae: True)
    monkeypatch.setattr(AutoencoderKLHunyuanVideo15, "decode", decode)
    out = tmp_path / "run"
    result = train(resolved(demo_project, out, **RUN))
    assert result.global_step == 6 and result.lora_path == out / "pytorch_lora_weights.safetensors"
    assert (out / "comfyui_lora.safetensors").is_file()
    assert calls[:3] == [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)]
    assert not list((out / "validation").rglob("*.mp4")) if (out / "validation").exists() else True
    skipped = (
        "validation step 6 validation_0.mp4: skipped: out of GPU memory decoding the video "
        "(untiled float32, tiled float32, tiled bfloat16)"
    )
    assert capsys.readouterr().out.count(skipped) == 1
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished" and skipped in status["validation_notes"]
    assert json.loads((out / "run.json").read_text())["global_step"] == 6


def test_the_lora_is_exported_before_the_final_validation(demo_project, tmp_path, monkeypatch):
    """A final validation that dies (any error) leaves the last step's checkpoint and both LoRA files behind; the
    rerun with resume_from_checkpoint=latest trains nothing and finishes."""
    from hvtune.output import validation

    def broken(*args, **kwargs):
        raise RuntimeError("the validation died")

    monkeypatch.setattr("hvtune.trainer.render_validation", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the validation died"):
        train(resolved(demo_project, out, max_train_steps=4, checkpointing_steps=100))
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "comfyui_lora.safetensors").is_file()
    assert (out / "checkpoints" / "checkpoint-000004").is_dir()
    monkeypatch.setattr("hvtune.trainer.render_validation", validation.render_validation)
    again = train(resolved(demo_project, out, max_train_steps=4, checkpointing_steps=100))
    assert again.global_step == 4 and again.lora_path == out / "pytorch_lora_weights.safetensors"
    losses = (out / "logs" / "loss.jsonl").read_text().splitlines()
    assert len(losses) == 4  # no step trained twice


def test_tiled_and_untiled_decode_agree(tiny_t2v):
    """diffusers' tiled decode blends each seam linearly over a quarter of the tile. The tiny VAE has random weights
    and a global attention block, so tiles see less context than a trained VAE's would: with 8 x 8 latent tiles
    (128 px) on 16 x 16 latents the tiled video is within 10 of 255 of the untiled one on average, PSNR > 24 dB
    (measured 8.7 and 26.2 dB)."""
    from hvtune.output.vae_decode import decode_latents

    vae = AutoencoderKLHunyuanVideo15.from_pretrained(tiny_t2v / "vae").eval()
    latents = torch.randn(1, vae.config.latent_channels, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = decode_latents(None, vae, latents, "cpu", False).float()
        vae.enable_tiling(
            tile_sample_min_height=128, tile_sample_min_width=128, tile_latent_min_height=8, tile_latent_min_width=8
        )
        tiles = []
        original = vae.decoder.forward
        vae.decoder.forward = lambda z, *a, **k: tiles.append(z.shape) or original(z, *a, **k)
        tiled = decode_latents(None, vae, latents, "cpu", False).float()
    assert len(tiles) == 9 and tiled.shape == whole.shape  # it really tiled: 3 x 3 overlapping tiles
    difference = tiled - whole
    psnr = 10 * torch.log10(255**2 / (difference**2).mean())
    assert difference.abs().mean() < 10 and psnr > 24, (difference.abs().mean(), psnr)


def test_validation_loads_only_the_decoder_and_frees_it(demo_project, tmp_path):
    import gc
    import weakref

    from hvtune.model.registry import resolve_model
    from hvtune.output.vae_decode import ValidationVAE

    cfg = resolved(demo_project, tmp_path / "run").train
    with ValidationVAE(cfg, resolve_model(cfg, ["vae"]), "cpu") as vae:
        assert vae.vae.encoder is None and vae.vae.decoder is not None
        assert vae.vae.use_tiling  # vae_enable_tiling unset: the decode tiles
        alive = weakref.ref(vae.vae)
    gc.collect()
    assert alive() is None


def test_vae_dtype_takes_simpletuners_values_and_names_the_latent_entries(demo_project, tmp_path, monkeypatch, capsys):
    from hvtune.cache import encoders
    from hvtune.cache.keys import vae_options

    names = {}
    monkeypatch.setattr(encoders, "gpu_present", lambda: True)
    for value in ("bf16", "fp16", "fp32", "default"):
        r = resolved(demo_project, tmp_path / "run", vae_dtype=value)
        names[value] = encoders.vae_encode_dtype_name(r)
        assert vae_options(r, names[value])["dtype"] == names[value]
    assert names == {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "default": "float32"}  # mixed "no"
    monkeypatch.setattr(encoders, "gpu_present", lambda: False)
    assert encoders.vae_encode_dtype_name(resolved(demo_project, tmp_path / "run", vae_dtype="bf16")) == "float32"
    assert main(["check", "--config", str(demo_project), "--vae_dtype=fp8"]) == 2
    assert "vae_dtype" in capsys.readouterr().err


def test_a_clip_that_does_not_fit_the_vae_encode_is_retried_tiled_then_reported(tmp_path, tiny_t2v, monkeypatch):
    from hvtune.cache import encoders
    from hvtune.cache.build import build_cache
    from hvtune.testing.demo import write_demo_project

    config = write_demo_project(tmp_path / "demo", task="t2v", steps=2)
    original = encoders.encode_video_latents
    seen = []

    def encode(vae, frames, device, dtype):
        seen.append(vae.use_tiling)
        if not vae.use_tiling or len(seen) > 4:  # the first two clips fit tiled; every later one fits nowhere
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return original(vae, frames, device, dtype)

    monkeypatch.setattr(encoders, "encode_video_latents", encode)
    build_cache(load_config(config, env={}), progress=False)
    report = [
        json.loads(line) for line in (tmp_path / "demo" / "cache" / "cache_report.jsonl").read_text().splitlines()
    ]
    reasons = [r["reason"] for r in report if r["action"] == "skipped"]
    assert reasons and set(reasons) == {"out_of_memory"}
    assert seen[:4] == [False, True, False, True]


# ---------------------------------------------------------------------------------------- the verdict before step 1

SEED_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "seed-project" / "config" / "config.json"


@functools.cache
def _seed_plan():
    """The seed's config as shipped (854x480 x 61 frames, vae_enable_tiling unset), simulated once at full size."""
    from hvtune.plan.prediction import simulate
    from hvtune.plan.shapes import shape_for

    resolved = load_config(SEED_CONFIG, env={}, check_paths=False)
    return simulate(resolved.train, shape_for(resolved))


@pytest.mark.parametrize("card", ["24GB", "48GB", "80GB"])
def test_the_seeds_config_fits_every_phase_on_24_48_and_80_gib_cards(card, monkeypatch, capsys):
    plan = _seed_plan()
    monkeypatch.setattr("hvtune.plan.report.simulate", lambda cfg, shape: plan)  # one simulation, three cards
    assert main(["plan", "--config", str(SEED_CONFIG), "--gpu", card, "--verdict"]) == 0
    out = capsys.readouterr().out
    size = card.removesuffix("GB")
    assert f"<= {size} GiB on this {size} GiB card" in out, out
    phases = [line for line in out.splitlines() if line.startswith("  fits") or line.startswith("  NO")]
    assert len(phases) == 5 and all(line.startswith("  fits") for line in phases), out  # no EMA in the seed
    assert "validation decode (tiled bfloat16)" in out  # the decode setting it chose
    assert "validation decode: tiled (" in out
    if size == "24":
        assert "validation decode: tiled (an untiled decode needs ~" in out and "more than this 24 GiB card" in out


def _untiled(plan):
    """`plan` with vae_enable_tiling: false."""
    settings = {**plan.settings, "vae_enable_tiling": False, "vae_tiling_unset": False}
    return dataclasses.replace(plan, settings=settings, validation=dataclasses.replace(plan.validation, tiling=False))


def test_a_phase_that_cannot_fit_is_refused_naming_phase_peak_card_and_key():
    from hvtune.model.architectures import GPU
    from hvtune.plan.phases import decide_phases

    untiled = _untiled(_seed_plan())
    card = GPU("24 GiB card", 24.0, None, 25.0, ())
    decided = decide_phases(untiled, card, unset=set())
    assert decided.refusal.startswith("validation decode (untiled bfloat16) is predicted to need ")
    assert "more than the 24 GiB of this 24 GiB card: set vae_enable_tiling=true" in decided.refusal


def test_train_refuses_before_step_1_when_a_phase_cannot_fit_this_gpu(demo_project, tmp_path, monkeypatch, capsys):
    """`hvtune train` with a (pretend) 24 GiB GPU visible: the seed's full-size plan stands in for the simulation
    (the demo's own flavour is the full-size t2v-480p). Untiled, the decode does not fit: exit 2 before any
    training, nothing written; unset, it tiles, says so once, and trains."""
    from hvtune.model.architectures import GPU

    plan = _seed_plan()
    monkeypatch.setattr("hvtune.plan.report.detected_gpu", lambda: GPU("RTX 4090", 23.99, 165.2, 25.0, ()))
    monkeypatch.setattr(
        "hvtune.plan.report.simulate", lambda cfg, shape: _untiled(plan) if cfg.vae_enable_tiling is False else plan
    )
    out = tmp_path / "run"
    args = ["train", "--config", str(demo_project), f"--output_dir={out}", "--max_train_steps=2"]
    assert main([*args, "--vae_enable_tiling=false"]) == 2
    err = capsys.readouterr().err
    assert "validation decode (untiled bfloat16) is predicted to need " in err
    assert "more than the 23.99 GiB of this RTX 4090: set vae_enable_tiling=true" in err
    assert not (out / "checkpoints").exists() and not (out / "pytorch_lora_weights.safetensors").exists()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("validation decode: tiled (an untiled decode needs ~") == 1
    assert (
        "pre-flight: every phase fits this RTX 4090" in printed and (out / "pytorch_lora_weights.safetensors").is_file()
    )


def test_a_size_alone_gives_memory_only_and_a_named_card_its_own_speed():
    from hvtune.model.architectures import find_gpu
    from hvtune.plan.report import format_plan, parse_gpu

    plan = _seed_plan()
    size = parse_gpu("24GB")
    assert size == parse_gpu("24 GiB") and size.bf16_tflops is None and size.memory_gib == 24
    text = format_plan(plan, size)
    assert "s/step: name the card" in text and "H100" not in text
    assert " GB" not in text and " GiB" in text  # one unit, labelled
    rtx = parse_gpu("RTX 4090")
    assert rtx.bf16_tflops == 165.2
    assert "predicted s/step on RTX 4090" in format_plan(plan, rtx) and "165.2 TFLOP/s" in format_plan(plan, rtx)
    assert plan.seconds_per_step(rtx) > 4 * plan.seconds_per_step(find_gpu("H100"))  # 165 vs 989 TFLOP/s + copies


# ------------------------------------------------------------------------------------------------ int8 accounting


def test_an_int8_linear_keeps_a_bf16_copy_of_its_weight_for_backward_unless_checkpointed():
    """torchao's Int8WeightOnlyConfig linear computes `mm(x, qdata.t().to(bf16)) * scale`: the bf16 copy is a new
    tensor that mm saves for the input's gradient. Without gradient checkpointing every int8 linear keeps it until
    its backward (plan counts it: int8 needs more than bf16 there); with checkpointing only the input is saved."""
    from torch.utils.checkpoint import checkpoint
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    def saved_bytes(run) -> int:
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
        return sum(saved.values())

    layer = torch.nn.Linear(2048, 8192).to(torch.bfloat16).requires_grad_(False)
    quantize_(layer, Int8WeightOnlyConfig())
    x = torch.randn(1, 256, 2048, dtype=torch.bfloat16, requires_grad=True)
    weight_bf16 = 2048 * 8192 * 2
    assert saved_bytes(lambda: layer(x)) == weight_bf16 + 8192 * 2  # the dequantised weight and the bf16 scale
    assert saved_bytes(lambda: checkpoint(layer, x, use_reentrant=False)) == x.numel() * 2  # the input only


def test_ema_validation_is_a_phase_with_the_ema_copy_and_the_trained_weights_aside():
    from hvtune.plan.phases import run_phases

    plan = _seed_plan()
    with_ema = dataclasses.replace(plan, settings={**plan.settings, "use_ema": True, "ema_validation": True})
    plain, ema = {p.name: p.peak for p in run_phases(plan)}, {p.name: p.peak for p in run_phases(with_ema)}
    assert "EMA validation" not in plain and list(ema)[-3:] == [
        "EMA validation",
        "checkpoint write",
        "final LoRA export",
    ]
    lora = plan.memory.lora_weights
    assert ema["training step"] == plain["training step"] + lora  # the float32 EMA copy stays on the device
    decode = next(name for name in plain if name.startswith("validation decode"))
    assert ema["EMA validation"] > ema[decode] > plain[decode]
