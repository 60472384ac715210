"""`hvtune plan`: the training step on meta tensors predicts what the real step allocates.

The prediction is checked against the same step run for real on this CPU (tiny architecture, the trainer's code),
both measured by the same tensor-level tracker; the full-size step runs for every flavour; the exact parts (weight
bytes, LoRA counts, optimizer state) are checked against their formulas."""

from __future__ import annotations

import functools
import math
import shutil
from pathlib import Path

import pytest

from hvtune.cli import main
from hvtune.config.settings import TrainConfig
from hvtune.model.architectures import GPU, GPUS, UnknownArchitecture, find_gpu, transformer_config
from hvtune.plan.prediction import _plan, simulate
from hvtune.plan.report import format_plan, format_sweep, how_to_fit, verdict
from hvtune.plan.shapes import StepShape
from hvtune.plan.simulate import build_meta_transformer, compare_with_cpu, prepare_step, run_step, state_tensors
from hvtune.plan.validation import (
    build_meta_vae,
    compare_validation_with_cpu,
    run_validation,
    simulate_validation,
    validation_shape,
)

SEED_PROJECT = Path(__file__).resolve().parents[1] / "examples" / "seed-project"
FULL_PARAMS = 8_326_608_160
TARGETED_PROJECTIONS = 54 * 8 + 2 * 4  # SimpleTuner's set: 8 projections per block, 4 per token-refiner block


@functools.cache
def _tiny_config(task: str) -> dict:
    from hvtune.testing.tiny_model import build_components

    return dict(build_components(task)["transformer"].config)


# (task, batch, settings): every memory option on and off, rank 4 / 32, batch 1 / 2, t2v / i2v, bf16 / fp32 / int8
CPU_CASES = [
    pytest.param("t2v", 1, dict(gradient_checkpointing=True, lora_rank=4), id="t2v-gc-r4-b1"),
    pytest.param("i2v", 2, dict(gradient_checkpointing=False, lora_rank=32), id="i2v-nogc-r32-b2"),
    pytest.param(
        "t2v", 2, dict(gradient_checkpointing=False, lora_rank=32), id="t2v-nogc-r32-b2", marks=pytest.mark.slow
    ),
    pytest.param("i2v", 1, dict(gradient_checkpointing=True, lora_rank=4), id="i2v-gc-r4-b1", marks=pytest.mark.slow),
    pytest.param(
        "t2v",
        1,
        dict(gradient_checkpointing=True, enable_group_offload=True),
        id="t2v-gc-offload",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "i2v",
        2,
        dict(gradient_checkpointing=False, enable_group_offload=True, lora_rank=4),
        id="i2v-nogc-offload-b2",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "t2v",
        1,
        dict(mixed_precision="no", base_model_precision="no_change", gradient_checkpointing=False),
        id="t2v-fp32",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "t2v",
        1,
        dict(base_model_precision="int8-torchao", optimizer="adamw8bit"),
        id="t2v-int8",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("task,batch,settings", CPU_CASES)
def test_plan_predicts_the_peak_of_a_real_cpu_step(task, batch, settings):
    cfg = TrainConfig(**settings)
    shape = StepShape(batch, 17, 384, 256, task, qwen_tokens=20)
    predicted, measured = compare_with_cpu(_tiny_config(task), cfg, shape)
    assert predicted.base_weights == measured.base_weights
    assert predicted.lora_params == measured.lora_params
    # on the CPU, AdamW's per-parameter step counters (4 bytes each) are device tensors too; on a GPU they are not
    assert 0 <= measured.optimizer_state - predicted.optimizer_state <= 4 * 200
    assert abs(predicted.peak / measured.peak - 1) < 0.10, (predicted.peak, measured.peak)
    # the part that is simulated, not counted: activations (and gradients in flight) alone, also within 10%
    assert measured.activations > 0.25 * measured.peak
    assert abs(predicted.activations / measured.activations - 1) < 0.10, (predicted.activations, measured.activations)


def test_checkpointing_lowers_the_predicted_activations():
    shape = StepShape(1, 17, 384, 256, "t2v", qwen_tokens=20)
    on = run_step(build_meta_transformer(_tiny_config("t2v")), TrainConfig(), shape, device="meta")
    off = run_step(
        build_meta_transformer(_tiny_config("t2v")), TrainConfig(gradient_checkpointing=False), shape, device="meta"
    )
    assert on.activations < 0.7 * off.activations


# ------------------------------------------------------------------------------------------------- exact parts


@functools.cache
def _full(flavour: str, **settings):
    transformer = build_meta_transformer(transformer_config(flavour))
    _, params, optimizer = prepare_step(transformer, TrainConfig(model_flavour=flavour, **settings), "meta")
    return transformer, params, optimizer


def _bytes(tensors) -> int:
    from hvtune.plan.tracker import storage_bytes

    return storage_bytes(list(tensors), "meta")


def test_full_size_base_weight_bytes_bf16_and_int8():
    import torch

    transformer, _, _ = _full("t2v-480p")
    frozen = [p for p in transformer.parameters() if not p.requires_grad]
    assert sum(p.numel() for p in frozen) == FULL_PARAMS
    assert _bytes(frozen) == 2 * FULL_PARAMS

    transformer, _, _ = _full("t2v-480p", base_model_precision="int8-torchao")
    linears = [m for name, m in transformer.named_modules() if type(m) is torch.nn.Linear and "lora_" not in name]
    linear_weights = sum(m.in_features * m.out_features for m in linears)
    rows = sum(m.out_features for m in linears)
    # torchao int8 weight-only: one byte per weight, a float32 scale and an int8 zero point per output row;
    # everything else (biases, norms, embeddings) stays bf16
    expected = linear_weights + (4 + 1) * rows + 2 * (FULL_PARAMS - linear_weights)
    frozen = [p for p in transformer.parameters() if not p.requires_grad]
    assert _bytes(frozen) == expected
    assert all(p.dtype == torch.float32 for p in transformer.parameters() if p.requires_grad)


@pytest.mark.parametrize("rank", [4, 16, 32])
def test_full_size_lora_parameter_count(rank):
    _, params, _ = _full("t2v-480p", lora_rank=rank)
    # every targeted projection is 2048 -> 2048: A (r x 2048) + B (2048 x r)
    assert sum(p.numel() for p in params) == rank * (2048 + 2048) * TARGETED_PROJECTIONS


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_bf16", "adamw8bit"])
def test_full_size_optimizer_state(optimizer):
    _, params, opt = _full("t2v-480p", optimizer=optimizer)
    states = [v for s in opt.state.values() for v in s.values() if hasattr(v, "device")]
    n = sum(p.numel() for p in params)
    if optimizer == "adamw8bit":
        # two uint8 states per weight, one float32 absmax per 256-weight block each, and the shared 256-entry maps
        blocks = sum(math.ceil(p.numel() / 256) for p in params)
        assert _bytes(states) == 2 * n + 2 * 4 * blocks + 2 * 256 * 4
    else:  # exp_avg and exp_avg_sq in float32 (the step counters live on the CPU)
        assert _bytes(states) == 2 * 4 * n


# ------------------------------------------------------------------------------------------------- full size


SEED_SETTINGS = dict(lora_rank=16, enable_group_offload=True, group_offload_type="block_level", optimizer="adamw_bf16")


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["t2v-480p", "t2v-720p", "i2v-480p", "i2v-720p"])
@pytest.mark.parametrize("settings", [{}, SEED_SETTINGS], ids=["defaults", "seed"])
def test_full_size_step_runs_under_plan(flavour, settings):
    task, res = flavour.split("-")
    frames, (width, height) = 61, {"480p": (848, 480), "720p": (1280, 720)}[res]
    cfg = TrainConfig(model_flavour=flavour, validation_disable=True, **settings)  # validation: its own tests
    plan = simulate(cfg, StepShape(1, frames, width, height, task))
    video_tokens = ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)
    assert plan.shape.video_tokens == video_tokens
    assert plan.memory.base_params == FULL_PARAMS
    assert 0 < plan.activations < 200 * 2**30
    if settings:  # offload keeps the base on the host and at most a few blocks on the GPU
        assert plan.device_weights < 0.2 * plan.memory.base_weights
        assert plan.host_weights == plan.memory.base_weights
        assert plan.gpu_peak < 24 * 2**30 or res == "720p"


# ------------------------------------------------------------------------------------------------- the command


def test_known_cards_are_found_by_the_names_users_and_cuda_use():
    assert find_gpu("RTX 4090").name == "RTX 4090"
    assert find_gpu("NVIDIA GeForce RTX 4090").name == "RTX 4090"
    assert find_gpu("NVIDIA A100-SXM4-80GB").name == "A100 80GB"
    assert find_gpu("A100 40").name == "A100 40GB"
    assert find_gpu("NVIDIA H100 80GB HBM3").name == "H100"
    assert find_gpu("h200").name == "H200"
    assert find_gpu("MI300X").name == "MI300X"
    assert find_gpu("Voodoo 5") is None


def test_unknown_card_lists_the_known_ones(capsys, tmp_path):
    project = tmp_path / "seed"
    shutil.copytree(SEED_PROJECT, project)
    code = main(["plan", "--config", str(project / "config" / "config.json"), "--gpu", "Voodoo 5"])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown GPU 'Voodoo 5'" in err
    assert all(g.name in err for g in GPUS)


def test_a_flavour_without_an_architecture_is_a_clear_error():
    with pytest.raises(UnknownArchitecture, match="no known architecture for model_flavour 't2v-1080p'"):
        transformer_config("t2v-1080p")


def test_a_setting_that_does_not_fit_says_by_how_much_and_which_knob():
    model_config = _tiny_config("t2v")
    shape = StepShape(1, 17, 384, 256, "t2v", qwen_tokens=20)
    cfg = TrainConfig(lora_rank=4)
    transformer = build_meta_transformer(model_config)
    memory = run_step(transformer, cfg, shape, device="meta")
    plan = _plan(cfg, shape, transformer, memory, model_config)
    tiny_card = GPU("tiny card", (plan.gpu_peak - memory.activations // 2) / 2**30, 100.0, 25.0, ())
    message = how_to_fit(plan, tiny_card)
    assert message.startswith("does not fit")
    assert "more than the" in message and "tiny card" in message
    assert "num_frames 17 ->" in message or "resolution x" in message


def test_the_planned_bucket_is_the_largest_the_seed_datasets_give_usual_clips():
    """The seed's own config (resolution 480, SimpleTuner's default pixel_area): the plan runs at the bucket a 16:9
    clip gets, the largest of the usual shapes, at the dataset's 61 frames."""
    from hvtune.config.settings import load_config
    from hvtune.data.buckets import dataset_bucket_rule, simpletuner_bucket
    from hvtune.data.datasets import media_datasets
    from hvtune.plan.shapes import largest_bucket, shape_for

    seed = Path(__file__).resolve().parents[1] / "examples" / "seed-project" / "config" / "config.json"
    resolved = load_config(seed, env={})
    [dataset] = media_datasets(resolved)
    rule = dataset_bucket_rule(dataset, resolved)
    wide, four_three = simpletuner_bucket(1920, 1080, rule), simpletuner_bucket(1440, 1080, rule)
    assert wide[0] * wide[1] > four_three[0] * four_three[1]
    assert largest_bucket(resolved) == (*wide, 61)
    shape = shape_for(resolved)
    assert (shape.width, shape.height, shape.frames) == (*wide, 61)


# ------------------------------------------------------------------------------------------------- validation

# the tiny validation video: 512 px wide is 32 latents, two VAE tiles (256 px each, 25% overlap: three tiles)
TINY_VALIDATION = dict(validation_resolution="512x64", validation_num_video_frames=5)


@functools.cache
def _tiny_vae_config() -> dict:
    from hvtune.testing.tiny_model import build_components

    return dict(build_components("t2v")["vae"].config)


def _ratio(predicted: int, measured: int) -> float:
    return predicted / measured


@pytest.mark.parametrize(
    "task,tiling",
    [pytest.param("t2v", False, id="t2v"), pytest.param("i2v", True, id="i2v-tiled", marks=pytest.mark.slow)],
)
def test_plan_predicts_the_validation_round_of_a_real_cpu_run(task, tiling):
    """sample_video's forward and the VAE decode (tiling as configured, then the other way), on meta and for real
    on the CPU, through the trainer's code, measured by the same tracker."""
    cfg = TrainConfig(vae_enable_tiling=tiling, lora_rank=4, **TINY_VALIDATION)
    shape = validation_shape(cfg, StepShape(1, 17, 384, 256, task, qwen_tokens=20))
    assert (shape.width, shape.height, shape.frames, shape.task) == (512, 64, 5, task)
    predicted, measured = compare_validation_with_cpu(_tiny_config(task), _tiny_vae_config(), cfg, shape)
    assert predicted.transformer_weights == measured.transformer_weights
    assert predicted.vae_weights == measured.vae_weights
    assert abs(_ratio(predicted.forward_peak, measured.forward_peak) - 1) < 0.10
    # what the forward adds (activations without gradients, latents, conditions) alone, also within 10%
    assert abs(_ratio(predicted.forward_extra, measured.forward_extra) - 1) < 0.10
    for tiled in (False, True):
        assert measured.decode_extra(tiled) > 0.5 * measured.decode_peaks[tiled]  # the decode is most of its peak
        assert abs(_ratio(predicted.decode_peaks[tiled], measured.decode_peaks[tiled]) - 1) < 0.10
        assert abs(_ratio(predicted.decode_extra(tiled), measured.decode_extra(tiled)) - 1) < 0.10
    assert predicted.decode_extra(True) < 0.75 * predicted.decode_extra(False)  # tiled: a third as wide at a time


VAE_PARAMS = 1_260_634_115
VAE_DECODER_PARAMS = 871_309_571


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["t2v-480p", "i2v-720p"])
def test_full_size_validation_runs_under_plan(flavour):
    """The first execution of sample_video and the VAE decode at full size: the trainer's round at the flavour's
    validation size, on meta."""
    task, res = flavour.split("-")
    width, height = {"480p": (848, 480), "720p": (1280, 720)}[res]
    cfg = TrainConfig(model_flavour=flavour)
    validation = simulate_validation(cfg, StepShape(1, 61, width, height, task))
    assert (validation.shape.width, validation.shape.height, validation.shape.frames) == (width, height, 61)
    assert validation.shape.latents == (32, 16, height // 16, width // 16)
    assert validation.vae_weights == 2 * VAE_DECODER_PARAMS  # the decoder alone, in vae_dtype's default bf16
    lora = 16 * (2048 + 2048) * TARGETED_PROJECTIONS * 4
    assert validation.transformer_weights == 2 * FULL_PARAMS + lora
    assert 0 < validation.forward_extra < 10 * 2**30  # no gradients: a few GB at most
    untiled, tiled = validation.decode_extra(False), validation.decode_extra(True)
    # untiled, the decoder's last blocks hold several 128 x 61 x H x W bf16 tensors (6.4 GB each at 480p)
    frame_bytes = 128 * 61 * height * width * 2
    assert 3 * frame_bytes < untiled < 8 * frame_bytes
    assert tiled < 0.25 * untiled  # tiling lowers the predicted decode peak


@functools.cache
def _tiny_plan(task: str = "t2v", **settings):
    """A plan of the tiny architecture: its step and its validation round simulated on meta."""
    model_config = _tiny_config(task)
    cfg = TrainConfig(lora_rank=4, **{**TINY_VALIDATION, "vae_enable_tiling": False, **settings})
    shape = StepShape(1, 17, 384, 256, task, qwen_tokens=20)
    transformer = build_meta_transformer(model_config)
    memory = run_step(transformer, cfg, shape, device="meta")
    validation = None
    if (vshape := validation_shape(cfg, shape)) is not None:
        sampler = build_meta_transformer(model_config)
        _, _, optimizer = prepare_step(sampler, cfg, "meta")
        vae = build_meta_vae(_tiny_vae_config())
        validation = run_validation(sampler, vae, cfg, vshape, device="meta", state=state_tensors(optimizer))
    return _plan(cfg, shape, transformer, memory, model_config, validation)


def test_validation_off_leaves_the_plan_unchanged():
    shape = StepShape(1, 61, 848, 480, "t2v")
    assert validation_shape(TrainConfig(validation_disable=True), shape) is None
    assert simulate_validation(TrainConfig(validation_disable=True), shape) is None
    on, off = _tiny_plan(), _tiny_plan(validation_disable=True)
    assert off.validation is None and off.run_peak == off.gpu_peak and off.host_peak <= on.host_peak
    assert on.gpu_peak == off.gpu_peak  # the step's own figures are the same either way
    text = format_plan(off)
    assert "validation off" in text and "VAE decode" not in text
    card = GPU("card", off.gpu_peak / 2**30 + 0.01, 100.0, 25.0, ())
    assert verdict(off, card).startswith(f"predicted peak {off.gpu_peak / 2**30:.1f} GiB <=")


def test_the_plan_needs_the_larger_of_step_and_validation_and_names_the_validation_knob():
    plan = _tiny_plan()  # the tiny decode of 512x64x5 outweighs the tiny step
    assert plan.validation_binds and plan.run_peak == plan.validation_peak() > plan.gpu_peak
    text = format_plan(plan)
    assert "512x64x5f" in text and "transformer forward peak" in text and "VAE decode peak" in text
    assert "tiling off" in text and "vae_enable_tiling=true:" in text
    # a card between the tiled and the untiled validation: the verdict says to tile
    tiled, untiled = plan.validation_peak(tiling=True), plan.validation_peak(tiling=False)
    assert tiled < untiled
    card = GPU("card", (tiled + untiled) / 2 / 2**30, 100.0, 25.0, ())
    line = verdict(plan, card)
    assert "validation" in line and "vae_enable_tiling=true" in line
    assert verdict(plan, card, [plan]).endswith(f"set vae_enable_tiling=true (predicted {tiled / 2**30:.1f} GiB)")
    table = format_sweep([plan], card)
    assert "\n  tile " in table and '"vae_enable_tiling": true,' in table
    # enable_model_cpu_offload takes the transformer's weights off the GPU for the decode
    offloaded = _tiny_plan(enable_model_cpu_offload=True)
    weights = offloaded.device_weights + offloaded.memory.lora_weights
    assert offloaded.validation_decode() == plan.validation_decode() - weights


def test_a_validation_that_cannot_fit_says_by_how_much_and_what_moves_it():
    plan = _tiny_plan()
    card = GPU("tiny card", (plan.gpu_peak + 2**20) / 2**30, 100.0, 25.0, ())  # the step fits, validation not
    message = how_to_fit(plan, card)
    assert message.startswith("does not fit: validation (512x64x5f, the VAE decode) needs")
    assert "more than the" in message and "validation_disable=true" in message


def test_i2v_validation_on_training_samples_plans_the_larger_size():
    training = StepShape(1, 61, 1280, 720, "i2v")
    assert validation_shape(TrainConfig(model_flavour="i2v-480p"), training).label() == "848x480x61f"
    cfg = TrainConfig(model_flavour="i2v-480p", validation_using_datasets=True)
    assert validation_shape(cfg, training).label() == "1280x720x61f"
