"""`hvtune plan --gpus N` (issue 23.4): the one-GPU plan per GPU under DDP, FSDP2 and context parallelism, with the
communication time from a stated interconnect. The plans here are the full-size model's (8,326,608,160 bf16
parameters, its real block structure read on the meta device) with a stated step: what scale.py adds is tested, the
simulation itself is tests/test_plan.py's; one slow test runs the real command end to end."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from hvtune.cli import main
from hvtune.model.architectures import GPU, find_gpu, forward_flops, train_step_flops, transformer_config
from hvtune.plan.prediction import GiB, Plan
from hvtune.plan.scale import (
    INTERCONNECTS,
    Layout,
    block_shares,
    format_scale,
    scale_plan,
    scale_sweep,
)
from hvtune.plan.shapes import StepShape
from hvtune.plan.simulate import StepMemory

SEED_PROJECT = Path(__file__).resolve().parents[1] / "examples" / "seed-project"
BASE_PARAMS = 8_326_608_160  # the full-size transformer (tests/test_plan.py counts it on meta)
LORA_PARAMS = 28_835_840  # rank 16 on the attention projections of the 54 blocks (`hvtune plan` on the seed config)
ROW = r"^\s+([\d.]+) GiB\s+(\d+) GPUs?\s+(.+?)\s{2,}\["  # peak, GPUs, layout (no card: no fits column)
CARD_24 = GPU("24 GiB card", 24.0, None, 25.0, ())


def full_size_plan(activations_gib: float, *, frames: int = 121, width: int = 1280, height: int = 720) -> Plan:
    """The full-size t2v-720p step with a stated activation peak: bf16 base, fp32 LoRA with AdamW's two moments,
    gradient checkpointing, no offload."""
    shape = StepShape(1, frames, width, height, "t2v", qwen_tokens=256)
    base, lora = BASE_PARAMS * 2, LORA_PARAMS * 4
    activations = int(activations_gib * GiB)
    memory = StepMemory(
        peak=base + lora + 2 * lora + activations, base_weights=base, lora_weights=lora, lora_grads=lora,
        optimizer_state=2 * lora, lora_params=LORA_PARAMS, base_params=BASE_PARAMS, seconds=0.0,
    )  # fmt: skip
    config = transformer_config("t2v-720p")
    flops = forward_flops(config, shape.video_tokens, shape.qwen_tokens, 0, 0, 1)
    settings = {"gradient_checkpointing": True, "enable_group_offload": False, "lora_rank": 16}
    return Plan(
        "t2v-720p", shape, settings, memory, base, 0, train_step_flops(flops, gradient_checkpointing=True)
    )  # fmt: skip


def test_fsdp2_on_two_gpus_holds_about_half_the_base_less_than_ddp():
    plan = full_size_plan(8.0)
    ddp = scale_plan(plan, Layout(2, fsdp=False), find_gpu("H100"), INTERCONNECTS["nvlink4"])
    fsdp = scale_plan(plan, Layout(2, fsdp=True), find_gpu("H100"), INTERCONNECTS["nvlink4"])
    base = plan.memory.base_weights
    saved = ddp.step_peak - fsdp.step_peak
    # half the base is on the other GPU; the root's modules and two blocks are gathered while they run
    largest, outside, _ = block_shares("t2v-720p")
    assert 0.0 < largest < 0.03 and 0.0 < outside < 0.1, (largest, outside)  # 54 blocks, small embedders
    assert fsdp.gathered == pytest.approx(base * (outside + 2 * largest), rel=1e-3)
    assert 0.38 * base < saved < 0.5 * base + plan.memory.lora_grads * 2, saved / base
    # without resharding after the forward every block stays gathered for the backward: no saving on the base
    whole = scale_plan(plan, Layout(2, fsdp=True, reshard_after_forward=False), None, INTERCONNECTS["nvlink4"])
    assert whole.base == base


def test_a_step_that_does_not_fit_one_24gib_card_fits_on_several():
    """720p, 121 frames: the base alone is 15.5 GiB, so 13.5 GiB of activations do not fit 24 GiB on one GPU, nor
    with DDP on any number, nor FSDP2 on two; FSDP2 with context parallelism splits both."""
    plan = full_size_plan(13.5)
    scaled = scale_sweep(plan, 8, CARD_24, INTERCONNECTS["pcie4"])
    one = next(s for s in scaled if s.layout.gpus == 1)
    assert not one.fits(CARD_24) and one.step_peak == plan.gpu_peak
    assert not any(s.fits(CARD_24) for s in scaled if not s.layout.fsdp and s.layout.cp == 1)
    fitting = [s.layout for s in scaled if s.fits(CARD_24)]
    assert Layout(2, fsdp=True, cp=2) in fitting and Layout(8, fsdp=True, cp=8) in fitting
    text = format_scale(scaled, CARD_24, INTERCONNECTS["pcie4"])
    assert "fewest GPUs that fit: FSDP2 + context parallel 2 on 2 GPU(s)" in text, text
    assert '"fsdp_enable": true' in text and '"context_parallel_size": 2' in text and "NUM_PROCESSES=2" in text
    assert "predicted, not measured" in text and "PCI-SIG" in text  # the figures and their source


def test_communication_time_grows_as_the_bandwidth_falls():
    plan = full_size_plan(4.0, frames=33, width=848, height=480)  # a short step: the links show in s/step
    gpu = find_gpu("H100")
    links = ["nvlink4", "pcie5", "ib-ndr", "pcie4", "eth100", "eth10"]
    rates = [INTERCONNECTS[k].gb_per_s for k in links]
    assert rates == sorted(rates, reverse=True)
    for layout in (Layout(8, fsdp=True), Layout(8, fsdp=False), Layout(8, fsdp=True, cp=4)):
        timed = [scale_plan(plan, layout, gpu, INTERCONNECTS[k]) for k in links]
        comm = [s.comm_s for s in timed]
        assert comm == sorted(comm) and comm[0] < comm[-1], (layout, comm)
        steps = [s.step_s for s in timed]
        assert steps == sorted(steps), (layout, steps)  # hidden behind compute while the link keeps up
        if layout.fsdp:  # the whole base crosses the link twice a step: a slow link shows
            assert steps[-1] > 2 * steps[0], (layout, steps)
    # FSDP2 moves the base twice a step (forward, backward); DDP only the LoRA gradients
    fsdp = scale_plan(plan, Layout(8, fsdp=True), gpu, INTERCONNECTS["eth10"])
    ddp = scale_plan(plan, Layout(8, fsdp=False), gpu, INTERCONNECTS["eth10"])
    assert fsdp.comm_s > 100 * ddp.comm_s


def test_context_parallel_splits_the_activations_and_pays_for_the_gathers():
    plan = full_size_plan(12.0)
    gpu = find_gpu("H100")
    alone = scale_plan(plan, Layout(2, fsdp=True), gpu, INTERCONNECTS["nvlink4"])
    split = scale_plan(plan, Layout(2, fsdp=True, cp=2), gpu, INTERCONNECTS["nvlink4"])
    assert split.activations == pytest.approx(alone.activations / 2, abs=1)
    assert 0 < split.kv_in_flight < GiB  # one layer's K and V of 60k tokens x 2048, bf16: 0.5 GiB
    assert split.exposed_comm_s > 0 and split.compute_s == pytest.approx(alone.compute_s / 2)
    # two GPUs on one micro-batch: half the samples per step of FSDP2 alone, each step faster
    assert split.layout.data_parallel == 1 and split.step_s < alone.step_s


def test_one_gpu_is_the_plan_itself():
    plan = full_size_plan(8.0)
    gpu = find_gpu("H100")
    one = scale_plan(plan, Layout(1, fsdp=False), gpu, INTERCONNECTS["pcie4"])
    assert one.step_peak == plan.gpu_peak and one.step_s == pytest.approx(plan.seconds_per_step(gpu))
    assert one.comm_s == 0


@pytest.mark.parametrize(
    ("flags", "expect"),
    [
        (["--gpus", "2", "--interconnect", "carrier-pigeon"], "unknown --interconnect 'carrier-pigeon'"),
        (["--gpus", "0"], "--gpus 0: at least 1"),
    ],
)
def test_a_bad_gpus_or_interconnect_is_one_line_before_any_simulation(capsys, tmp_path, flags, expect):
    project = tmp_path / "seed"
    shutil.copytree(SEED_PROJECT, project)
    code = main(["plan", "--config", str(project / "config" / "config.json"), *flags])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]  # the config's own notice aside
    assert code == 2 and len(errors) == 1 and expect in errors[0], err


@pytest.mark.slow
def test_plan_gpus_prints_every_layout_per_gpu(tmp_path):
    """The real command: the seed config's full-size step simulated once, then per GPU on up to 4 GPUs."""
    from conftest import run_hvtune

    project = tmp_path / "seed"
    shutil.copytree(SEED_PROJECT, project)
    r = run_hvtune(
        "plan", "--config", str(project / "config" / "config.json"), "--gpus", "4", "--validation_disable=true",
        "--enable_group_offload=false", cwd=project,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    table = lines[lines.index(next(ln for ln in lines if ln.startswith("several GPUs"))) :]
    assert "interconnect: PCIe 4.0 x16, 31.5 GB/s" in table[1]
    rows = {f"{m[2]} {m[3]}": float(m[1]) for ln in table[2:] if (m := re.match(ROW, ln))}
    assert set(rows) >= {"1 1 GPU", "2 DDP", "2 FSDP2", "4 FSDP2 + context parallel 4"}, rows
    assert rows["2 FSDP2"] < rows["2 DDP"] - 5  # about half of the 15.5 GiB base
