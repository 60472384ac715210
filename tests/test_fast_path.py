"""The fast path (issue 22): attention kernels chosen by SimpleTuner's `attention_mechanism` compute what the default
(PyTorch SDPA) computes, and a kernel, or an fp8 base, this machine cannot run is refused at `hvtune check`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tests.conftest import run_hvtune

from hvtune.cache.manifest import load_manifest
from hvtune.config.schema import TrainConfig
from hvtune.config.settings import load_config
from hvtune.model.registry import load_transformer, resolve_model
from hvtune.train.base_model import prepare_base
from hvtune.train.batches import load_batch, plan_epoch
from hvtune.train.objective import training_loss

CPU_MECHANISMS = ("native", "native-math", "flex")  # the dispatcher backends that run on a CPU


@pytest.fixture(scope="module")
def tiny(demo_project):
    resolved = load_config(demo_project, env={})
    return load_manifest(resolved), load_transformer(resolve_model(resolved.train, ["transformer"])).eval()


def _with_kernel(stock, mechanism: str):
    model = copy.deepcopy(stock)
    cfg = TrainConfig(
        base_model_precision="no_change",
        mixed_precision="no",
        gradient_checkpointing=False,
        attention_mechanism=mechanism,
    )
    prepare_base(model, cfg, "cpu")
    return model


def _losses(model, batch, grad: bool) -> torch.Tensor:
    with torch.set_grad_enabled(grad):  # training steps and validation may run different kernels (SageAttention)
        kw = dict(seed=0, epoch=0, shift=5.0, image_embed_shape=(0, model.config.image_embed_dim))
        return training_loss(model, batch, **kw)[1]["loss_per_sample"].detach()


def _padded_and_unpadded(manifest):
    """One sample alone (nothing padded) and two captions of different lengths together (the shorter padded)."""
    plan = plan_epoch(manifest, global_batch_size=1, seed=0, epoch=0)
    lengths = {int(load_batch(manifest, items).prompt_mask.sum()): items for items in plan}
    short, long = (lengths[k] for k in sorted(lengths)[:2])
    together = load_batch(manifest, short + long)
    assert not bool(together.prompt_mask.all()), "the demo captions should differ in length"
    return {"unpadded": load_batch(manifest, short), "padded": together}


@pytest.mark.parametrize("mechanism", CPU_MECHANISMS)
def test_every_cpu_attention_kernel_gives_the_default_losses_with_and_without_padding(tiny, mechanism):
    manifest, stock = tiny
    default, chosen = _with_kernel(stock, "kohaku-fa-auto"), _with_kernel(stock, mechanism)
    assert {b.attn.processor.backends for b in chosen.transformer_blocks} != {(None, None)}
    for name, batch in _padded_and_unpadded(manifest).items():
        for grad in (True, False):
            expected, got = _losses(default, batch, grad), _losses(chosen, batch, grad)
            # fp32: kernels sum in different orders; 1e-5 relative is a few ulps of the fp32 loss
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=f"{mechanism}, {name}, grad={grad}")


def test_sageattention_runs_in_validation_only_by_default_as_in_simpletuner():
    from hvtune.config.kernels import attention_backends

    assert attention_backends("sageattention", "inference") == (None, "sage")
    assert attention_backends("sageattention", "training+inference") == ("sage", "sage")
    assert attention_backends("flash_attn", "inference") == ("flash", "flash")  # SimpleTuner reads '_' as '-'
    assert attention_backends("kohaku-fa-auto", "inference") == (None, None)  # SDPA, the dispatcher's default


@pytest.mark.parametrize(
    ("flag", "says"),
    [
        ("--attention_mechanism=flash-attn", "attention_mechanism = 'flash-attn': the flash kernel needs a GPU"),
        (
            "--attention_mechanism=sageattention",
            "attention_mechanism = 'sageattention': the sage kernel needs an NVIDIA",
        ),
        ("--attention_mechanism=sla", "sparse-linear attention changes the model's attention and is not implemented"),
        ("--attention_mechanism=warp-speed", "attention_mechanism = 'warp-speed': one of diffusers, kohaku-fa-auto"),
    ],
)
def test_check_refuses_a_kernel_this_machine_cannot_run_in_one_line(demo_project, flag, says):
    result = run_hvtune("check", "--config", str(demo_project), flag)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if "attention_mechanism" in line]
    assert len(lines) == 1 and says in lines[0], result.stderr
    assert "use diffusers (PyTorch SDPA)" in lines[0] or "one of" in lines[0]  # the way out


def test_a_missing_kernel_package_names_what_to_install(monkeypatch):
    """On a GPU without the flash-attn package the refusal is diffusers' own line: what to pip install."""
    from hvtune.config.rules import check_device_support

    cfg = TrainConfig(attention_mechanism="flash-attn")
    (problem,) = check_device_support(cfg, "cuda")
    assert "flash-attn" in str(problem) and "install" in str(problem)
    assert check_device_support(TrainConfig(attention_mechanism="native-math"), "cpu") == []


def test_check_refuses_an_fp8_matmul_base_on_a_card_without_fp8_matmuls_naming_it_and_the_nearest_settings(
    monkeypatch,
):
    from hvtune.config import kernels

    monkeypatch.setattr(kernels, "card_description", lambda device: ("NVIDIA A100 (compute capability 8.0)", False))
    rule = kernels.fp8_problem("fp8-torchao", "cuda")
    assert "needs fp8 matmuls" in rule and "this machine: NVIDIA A100 (compute capability 8.0)" in rule
    assert "Nearest that works: fp8wo-torchao (fp8 weights, bf16 matmuls) or int8-torchao" in rule
    assert kernels.fp8_problem("fp8wo-torchao", "cuda") is None  # weight-only: bf16 matmuls, any machine
    assert kernels.fp8_problem("int8-torchao", "cuda") is None
    monkeypatch.setattr(kernels, "card_description", lambda device: ("NVIDIA H100 (compute capability 9.0)", True))
    assert kernels.fp8_problem("fp8-torchao", "cuda") is None


def test_check_refuses_an_fp8_base_on_an_a100_in_one_line(demo_project):
    """Through the real command: `check` on a (simulated) A100 says the card and the way out, exit 2."""
    script = (
        "import sys, torch; from hvtune.config import kernels; from hvtune.model import registry;"
        "from hvtune.cli import main;"
        "kernels.card_description = lambda d: ('NVIDIA A100-SXM4-80GB (compute capability 8.0)', False);"
        "registry.detect_device = lambda: 'cuda';"
        f"sys.exit(main(['check', '--config', {str(demo_project)!r}, '--base_model_precision=fp8-torchao']))"
    )
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_app_env())
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "base_model_precision" in line]
    assert "NVIDIA A100-SXM4-80GB (compute capability 8.0)" in line and "fp8wo-torchao" in line


def _app_env() -> dict:
    import os
    from pathlib import Path

    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "app")}


def _fp8_model(stock, precision: str):
    from hvtune.train.lora import add_lora

    model = copy.deepcopy(stock)
    cfg = TrainConfig(base_model_precision=precision, mixed_precision="bf16", gradient_checkpointing=True)
    prepare_base(model, cfg, "cpu")
    torch.manual_seed(0)
    add_lora(model, cfg)
    return model


@pytest.mark.parametrize("precision", ["fp8-torchao", "fp8wo-torchao"])
def test_an_fp8_base_converts_the_blocks_linears_only_and_leaves_lora_trainable_in_fp32(tiny, precision):
    from torchao.float8.float8_linear import Float8Linear
    from torchao.quantization import Float8Tensor

    _, stock = tiny
    model = _fp8_model(stock, precision)
    base_layers = {n: m.base_layer for n, m in model.named_modules() if hasattr(m, "base_layer")}
    in_blocks = [n for n in base_layers if n.startswith("transformer_blocks.")]
    assert in_blocks
    for name in in_blocks:
        layer = base_layers[name]
        fp8 = isinstance(layer, Float8Linear) if precision == "fp8-torchao" else isinstance(layer.weight, Float8Tensor)
        assert fp8, name
        assert not layer.weight.requires_grad
    outside = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "transformer_blocks." not in n]
    assert outside and not any(isinstance(m, Float8Linear) or type(m.weight) is not torch.nn.Parameter for m in outside)
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad and p.dtype == torch.float32 and type(p) is torch.nn.Parameter for _, p in lora)
    assert not any(isinstance(m, Float8Linear) for n, m in model.named_modules() if "lora_" in n)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in lora}


@pytest.mark.slow  # about a minute each on this 2-core machine under load
@pytest.mark.parametrize("precision", ["fp8-torchao", "fp8wo-torchao"])
def test_a_training_step_with_an_fp8_base_has_the_bf16_base_loss_within_5e_3(tiny, precision):
    """torch 2.13 runs torchao's float8 matmuls (`_scaled_mm`) and fp8 weights on this CPU: three steps, bf16 autocast,
    gradient checkpointing. e4m3 keeps 3 mantissa bits; measured 7e-4 relative (fp8-torchao) and 6.5e-4
    (fp8wo-torchao) over the tiny model; the bound leaves 7x room. The LoRA gets gradients through the fp8 layers."""
    manifest, stock = tiny
    batches = [load_batch(manifest, items) for items in plan_epoch(manifest, global_batch_size=2, seed=0, epoch=0)[:3]]
    losses = {}
    for name in ("bf16", precision):
        model = _fp8_model(stock, name)
        losses[name] = []
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                kw = dict(seed=0, epoch=0, shift=5.0, image_embed_shape=(0, model.config.image_embed_dim))
                loss, _ = training_loss(model, batch, **kw)
            loss.backward()
            losses[name].append(loss.item())
        grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n and p.grad is not None]
        assert len(grads) > 10 and sum(float(g.abs().sum()) for g in grads) > 0, name
    torch.testing.assert_close(torch.tensor(losses[precision]), torch.tensor(losses["bf16"]), rtol=5e-3, atol=0)
    assert losses[precision] != losses["bf16"]  # the fp8 path really ran


# ---------------------------------------------------------------------------------------------- torch.compile


def test_defaults_compile_nothing():
    from hvtune.train.compile import compile_transformer

    said = []
    assert compile_transformer(object(), TrainConfig(), said.append) is None and said == []  # eager, as before


@pytest.mark.slow
def test_regional_compilation_trains_the_same_losses_and_lora_as_eager(demo_project, tmp_path):
    """CPU inductor, fp32, the tiny model: the loss curve and the LoRA of a compiled run match the eager run's.
    Inductor fuses and reorders fp32 sums, so bit equality is not expected: measured 1.1e-7 relative on the losses
    and 6e-5 relative (norm of the difference) on the LoRA in bf16; the fp32 bounds below leave 10x room."""
    from safetensors.torch import load_file

    from hvtune.trainer import train

    fp32 = ["--mixed_precision=no", "--base_model_precision=no_change", "--max_train_steps=3", "--validation_disable=1"]
    runs = {}
    for name, extra in {
        "eager": [],
        "regional": ["--dynamo_backend=inductor", "--dynamo_use_regional_compilation=1"],
    }.items():
        out = tmp_path / name
        train(load_config(demo_project, env={}, argv=[f"--output_dir={out}", *fp32, *extra]))
        losses = [json.loads(line)["loss"] for line in (out / "logs/loss.jsonl").read_text().splitlines()]
        runs[name] = torch.tensor(losses), load_file(out / "pytorch_lora_weights.safetensors")
    (eager_losses, eager_lora), (compiled_losses, compiled_lora) = runs["eager"], runs["regional"]
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=0)
    assert eager_lora.keys() == compiled_lora.keys()
    worst = max(float((compiled_lora[k] - eager_lora[k]).norm() / eager_lora[k].norm()) for k in eager_lora)
    assert worst < 1e-4, worst


def test_an_unknown_dynamo_backend_is_one_line_listing_torchs_backends(demo_project):
    result = run_hvtune("check", "--config", str(demo_project), "--dynamo_backend=warp")
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "dynamo_backend" in line]
    assert "no (eager) or one of torch.compile's backends" in line and "inductor" in line


@pytest.mark.slow
def test_plan_states_the_speed_up_it_assumes_for_compile_and_a_kernel_and_simulates_without_its_package(demo_project):
    """flash-attn is not installed here: plan (for another machine) still simulates the step, with SDPA's memory."""
    flags = ["--dynamo_backend=inductor", "--attention_mechanism=flash-attn"]
    result = run_hvtune("plan", "--config", str(demo_project), "--gpu", "H100", *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    said = "assumed speed-up: compile (inductor) x1 (none measured), flash-attn x1 (none measured); the s/step is"
    assert said in result.stdout
    assert "+ compile workspace (assumed)" in result.stdout  # its memory, stated
    rows = [line for line in result.stdout.splitlines() if line.startswith(("  fits", "  no", "  tile"))]
    assert any("fp8 base" in r for r in rows) and any("fp8 weight-only base" in r for r in rows)  # H100: fp8
    assert 'speed settings H100 can use: dynamo_backend "inductor" x1; attention_mechanism flash-attn' in result.stdout
    assert 'base_model_precision "fp8-torchao" x1 (assumed factors: none measured yet)' in result.stdout
    # the default run: nothing assumed, nothing said (plan prints speed_assumption of its settings; a second sweep
    # here would cost CI minutes)
    from hvtune.config.schema import TrainConfig
    from hvtune.plan.prediction import MEMORY_KNOBS, OTHER_SETTINGS, SPEED_SETTINGS, speed_assumption

    defaults = TrainConfig()
    assert (
        speed_assumption({k: getattr(defaults, k) for k in (*MEMORY_KNOBS, *OTHER_SETTINGS, *SPEED_SETTINGS)}) is None
    )


def test_check_refuses_fullgraph_compile_with_group_offload_in_one_line(demo_project):
    """diffusers' group offload onloads in a function excluded from compilation: a graph break fullgraph forbids."""
    flags = ["--dynamo_backend=inductor", "--dynamo_fullgraph=1", "--enable_group_offload=1"]
    result = run_hvtune("check", "--config", str(demo_project), *flags)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "dynamo_fullgraph" in line]
    assert "cannot work with enable_group_offload" in line and "set dynamo_fullgraph: false" in line
    without = run_hvtune("check", "--config", str(demo_project), *flags[:1], *flags[2:])
    assert without.returncode == 0, without.stderr[-2000:]  # compile with offload runs (docs/PERFORMANCE.md, measured)


def test_plan_counts_an_fp8_weight_only_base_as_the_bytes_torchao_really_stores(tiny):
    """plan derives fp8wo-torchao's weights from its bf16 simulation: what the real conversion stores (fp8 weights
    and their scales, measured by plan's own byte tracker on the converted tiny model) is what it predicts."""
    from hvtune.plan.prediction import fp8_weight_bytes
    from hvtune.plan.tracker import tensor_bytes
    from hvtune.train.base_model import fp8_base, fp8_linear

    _, stock = tiny
    model = copy.deepcopy(stock).to(torch.bfloat16)
    bf16, predicted = fp8_weight_bytes(model)
    names = [name for name, module in model.named_modules() if fp8_linear(module, name)]
    assert sum(tensor_bytes(model.get_submodule(n).weight) for n in names) == bf16
    assert fp8_base(model, "fp8wo-torchao") == len(names) > 0
    stored = sum(tensor_bytes(model.get_submodule(n).weight) for n in names)
    assert stored == predicted and predicted < 0.6 * bf16


def test_the_plan_sweep_offers_fp8_matmuls_only_on_cards_that_have_them():
    from hvtune.model.architectures import GPUS
    from hvtune.plan.prediction import _fp8_precisions

    cards = {gpu.name: gpu for gpu in GPUS}
    assert _fp8_precisions(cards["H100"]) == ["fp8wo-torchao", "fp8-torchao"]
    assert _fp8_precisions(cards["RTX 4090"]) == ["fp8wo-torchao", "fp8-torchao"]
    assert _fp8_precisions(cards["A100 80GB"]) == ["fp8wo-torchao"]  # weight-only fp8 needs no fp8 matmul
    assert _fp8_precisions(cards["RTX 3090"]) == ["fp8wo-torchao"]
    from hvtune.plan.prediction import speed_options

    assert "fp8-torchao" not in speed_options(cards["A100 80GB"]) and "aiter" in speed_options(cards["MI300X"])


def test_a_compiled_transformer_declares_padding_before_its_blocks_with_the_losses_of_asking_in_each(tiny):
    """`compile_transformer` answers "is anything padded?" once per forward from the transformer's inputs, so no host
    sync breaks the compiled blocks' graphs; the answer, and so every loss, is the one the blocks would have asked."""
    from hvtune.model.attention import declare_padding_before_each_forward

    manifest, stock = tiny
    asking, declaring = _with_kernel(stock, "kohaku-fa-auto"), _with_kernel(stock, "kohaku-fa-auto")
    declare_padding_before_each_forward(declaring)
    for name, batch in _padded_and_unpadded(manifest).items():
        expected, got = _losses(asking, batch, grad=True), _losses(declaring, batch, grad=True)
        assert torch.equal(got, expected), name
        declared = {b.attn.processor.all_valid_declared for b in declaring.transformer_blocks}
        assert declared == {name == "unpadded"}, (name, declared)
    assert {b.attn.processor.all_valid_declared for b in asking.transformer_blocks} == {None}  # eager: unchanged
