"""Full-size GPU benchmark: the real 8.3B HunyuanVideo 1.5 transformer, random weights, LoRA rank 16.

    PYTHONPATH=app python benchmarks/bench_gpu.py                  # every configuration, 480p and 720p
    PYTHONPATH=app python benchmarks/bench_gpu.py --res 480p --configs plain,gc
    PYTHONPATH=app python benchmarks/bench_gpu.py --cpu-smoke      # same code end to end on the CPU, tiny sizes, < 60 s

The model is built directly on the GPU in bf16 from the real architecture (no download): `REAL_CONFIG` is
`hvtune.model.architectures.TRANSFORMER_CONFIG` (diffusers' own TRANSFORMER_CONFIGS; see that module), with target_size
640 (480p) / 960 (720p). 8,326,608,160 parameters.

Each configuration runs in its own subprocess (an OOM or a hang in one does not take the rest down, and peak memory
starts clean) through the trainer's own code: `hvtune.train.base_model.prepare_base` (precision, int8-torchao, gradient
checkpointing, group offload), `hvtune.train.lora.add_lora` (rank 16), `hvtune.train.optim.build_optimizer`, then
the trainer's own `hvtune.train.step.training_step` (the objective with `hvtune.train.objective.schedule_options`,
backward, the configured grad clipping, the optimizer step) under an `accelerate.Accelerator`, on an
`hvtune.train.batches.Batch` of random tensors with the real shapes.

Reported per configuration: s/step (median of the timed steps after warm-up, torch.cuda.synchronize around each),
peak VRAM (torch.cuda.max_memory_allocated, from after setup to the end of the timed steps), tokens/s and MFU.

FLOPs (analytic, `forward_flops`): per token and per block, each stream (video tokens through the image stream, text
and image-condition tokens through the context stream) does 2*(4 + 2*mlp_ratio)*d^2 = 24*d^2 matmul FLOPs
(q, k, v, out and the 4x MLP), and the joint attention does 4*S^2*d per block (QK^T and PV over the whole sequence S,
padding included as the kernels compute it); plus the token refiner, the embedders and proj_out. Forward = their sum;
training step = 3 x forward (backward = 2 x forward, the usual MFU convention; gradient-checkpointing recompute is
not counted). MFU = training FLOPs / (s/step * peak), peak = the card's dense bf16 peak (H100 SXM, H200: 989 TFLOP/s).
This equals "2 * params * tokens + attention" with params = the 2.7B per-token weights of each stream (24*d^2*54):
the naive 2 * 8.3B * S would count the 2.7B adaLN modulation weights (applied once per sample, not per token) and
both streams' weights for every token, and overstate the FLOPs about 3x; it is in the JSON as `naive_6NS_tflop`.

Also reported: which SDPA backend PyTorch runs (flash / efficient / cudnn / math, from the profiler's aten op) at the
real attention shape with no mask, with diffusers' dense all-True mask, and with the pipeline's padding mask, and each
backend's fwd+bwd time when restricted to it (torch.nn.attention.sdpa_kernel); and which one the model itself ran.

Results: a table on stdout and JSON in benchmarks/results/gpu-<device name>.json (merged with an existing file, so
configurations can be run in several invocations).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import (
    PIPELINE_TEXT,
    RESOLUTIONS,
    RESULTS,
    SDPARecorder,
    step_accelerator,
    subprocess_env,
    table,
    write_result,
)

from hvtune.flavours import FLAVOURS

# The real architecture, the FLOP model and the cards' peaks live in the package (`hvtune plan` uses them too).
from hvtune.model.architectures import (
    TINY_TRANSFORMER_CONFIG,
    forward_flops,
    latent_shape,
    peak_bf16_tflops,
)
from hvtune.model.architectures import TRANSFORMER_CONFIG as REAL_CONFIG

# --cpu-smoke: the same code on a model the CPU runs in seconds (the tiny model's, hidden 64: 2 heads of 32, fp32)
SMOKE_CONFIG = dict(TINY_TRANSFORMER_CONFIG, attention_head_dim=32, mlp_ratio=4.0, rope_axes_dim=(8, 12, 12))
SMOKE_RESOLUTION = (5, 64, 96)  # -> latents (1, 32, 2, 4, 6): 48 video tokens
SMOKE_TEXT = {"qwen_pad": 40, "byt5_pad": 8, "image": 9, "caption": 12}

DEFAULT_CAPTION_TOKENS = 120  # Qwen valid tokens incl. the 5 template tokens; bench_seqlen.py measures real captions


# Memory configurations (the trainer's config keys) x text layouts.
MEMORY = {
    "plain": dict(gradient_checkpointing=False),
    "gc": dict(gradient_checkpointing=True),
    "gc+offload": dict(gradient_checkpointing=True, enable_group_offload=True),
    "gc+offload+stream": dict(gradient_checkpointing=True, enable_group_offload=True, group_offload_use_stream=True),
    "gc+int8": dict(gradient_checkpointing=True, base_model_precision="int8-torchao"),
    "gc+offload+stream+int8": dict(
        gradient_checkpointing=True,
        enable_group_offload=True,
        group_offload_use_stream=True,
        base_model_precision="int8-torchao",
    ),
    "plain+int8": dict(gradient_checkpointing=False, base_model_precision="int8-torchao"),
    # the fast path (issue 22; session.sh fastpath): compile, attention kernels, fp8 base, each against "gc"
    "gc+compile": dict(gradient_checkpointing=True, dynamo_backend="inductor", dynamo_use_regional_compilation=True),
    "gc+fp8": dict(gradient_checkpointing=True, base_model_precision="fp8-torchao"),
    "gc+fp8wo": dict(gradient_checkpointing=True, base_model_precision="fp8wo-torchao"),
    "gc+compile+fp8": dict(
        gradient_checkpointing=True,
        dynamo_backend="inductor",
        dynamo_use_regional_compilation=True,
        base_model_precision="fp8-torchao",
    ),
    **{
        f"gc+{kernel}": dict(gradient_checkpointing=True, attention_mechanism=kernel)
        for kernel in ("native-flash", "native-efficient", "native-math", "cudnn", "flex", "flash-attn", "flash-attn-3")
    },
}
FASTPATH_SMOKE_CONFIGS = ["gc:maskfree", "gc+compile:maskfree", "gc+native-math:maskfree", "gc+fp8:maskfree"]
# Every configuration runs hvtune.train.base_model.prepare_base, so the blocks use
# hvtune.model.attention.KeyPaddingAttnProcessor: a
# (B, 1, 1, S) key mask when a token is padded, no mask otherwise.
# padded: the pipeline's layout (1000 + 256 + 729): padding, key mask
# trimmed: text trimmed only (Qwen trimmed to the caption, 1 masked ByT5 token, 729 zero t2v image tokens; hvtune before
#          2026-12): padding left, key mask
# maskfree: hvtune's layout now for a batch without padding (Qwen trimmed, 0 ByT5 tokens, 0 image tokens for t2v):
#           SDPA gets attn_mask=None
TEXT_MODES = ("padded", "trimmed", "maskfree")
SMOKE_CONFIGS = ["plain", "gc", "gc+offload", "gc+int8", "gc:trimmed", "gc:maskfree"]
DEFAULT_CONFIGS = {
    "480p": [
        "plain",
        "gc",
        "gc+offload",
        "gc+offload+stream",
        "gc+int8",
        "gc+offload+stream+int8",
        "plain:trimmed",
        "plain:maskfree",
        "gc:maskfree",
        "gc+offload+stream:maskfree",
    ],
    "720p": ["gc:maskfree", "gc+offload+stream:maskfree", "gc", "gc+offload+stream+int8:maskfree"],
}


def text_layout(mode: str, smoke: bool, caption_tokens: int) -> dict:
    """Token counts fed to the transformer for one sample (t2v)."""
    pad = SMOKE_TEXT if smoke else PIPELINE_TEXT
    cap = SMOKE_TEXT["caption"] if smoke else caption_tokens
    if mode == "padded":
        return {
            "qwen": pad["qwen_pad"],
            "qwen_valid": cap,
            "byt5": pad["byt5_pad"],
            "byt5_valid": 0,
            "image": pad["image"],
        }
    if mode == "trimmed":
        return {"qwen": cap, "qwen_valid": cap, "byt5": 1, "byt5_valid": 0, "image": pad["image"]}
    if mode == "maskfree":
        return {"qwen": cap, "qwen_valid": cap, "byt5": 0, "byt5_valid": 0, "image": 0}
    raise ValueError(f"unknown text mode {mode!r}; one of {TEXT_MODES}")


def parse_config(name: str) -> tuple[str, str]:
    memory, _, text = name.partition(":")
    text = text or "padded"
    if memory not in MEMORY:
        raise SystemExit(f"unknown configuration {memory!r}; one of {', '.join(MEMORY)}")
    if text not in TEXT_MODES:
        raise SystemExit(f"unknown text layout {text!r} in {name!r}; one of {', '.join(TEXT_MODES)}")
    return memory, text


# ------------------------------------------------------------------------------------------------------- worker


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "diffusers", "peft", "torchao", "transformers", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def probe_device(_spec: dict) -> dict:
    import torch

    info = {"versions": _versions(), "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None)}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            device="cuda",
            name=p.name,
            total_memory_gib=round(p.total_memory / 2**30, 1),
            capability=f"{p.major}.{p.minor}",
            count=torch.cuda.device_count(),
        )
    else:
        import platform

        info.update(
            device="cpu",
            name="cpu",
            total_memory_gib=None,
            capability=None,
            count=0,
            cpu=platform.processor() or platform.machine(),
            threads=torch.get_num_threads(),
        )
    return info


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak(device) -> dict:
    import resource

    import torch

    out = {"host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if device.type == "cuda":
        out["peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return out


def build_transformer(model_cfg: dict, device, dtype):
    """The real architecture with random weights, allocated and initialised directly on `device` in `dtype`."""
    import torch
    from diffusers import HunyuanVideo15Transformer3DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = HunyuanVideo15Transformer3DModel(**model_cfg)
    finally:
        torch.set_default_dtype(previous)
    return model


def make_batch(model_cfg: dict, latents: tuple, text: dict, max_qwen: int, seed: int = 0):
    """An hvtune.train.batches.Batch of random tensors with the real shapes (t2v), on the CPU like load_batch returns.
    The valid tokens are the same whatever the layout (drawn at the longest length, then cut), so every layout
    describes the same sample and must give the same loss."""
    import torch

    from hvtune.train.batches import Batch

    g = torch.Generator().manual_seed(seed)
    c, f, h, w = latents
    x0 = torch.randn(1, c, f, h, w, generator=g)
    qwen_mask = torch.zeros(1, text["qwen"], dtype=torch.int64)
    qwen_mask[:, : text["qwen_valid"]] = 1
    qwen = torch.randn(1, max(max_qwen, text["qwen"]), model_cfg["text_embed_dim"], generator=g)
    byt5_mask = torch.zeros(1, text["byt5"], dtype=torch.int64)
    byt5_mask[:, : text["byt5_valid"]] = 1
    return Batch(
        latents=x0,
        cond_latents=torch.zeros_like(x0),
        cond_mask=torch.zeros(1, 1, f, h, w),
        image_embeds=None,
        prompt_embeds=qwen[:, : text["qwen"]] * qwen_mask[..., None],
        prompt_mask=qwen_mask,
        prompt_embeds_2=torch.zeros(1, text["byt5"], model_cfg["text_embed_2_dim"]),
        prompt_mask_2=byt5_mask,
        sample_indices=[0],
        draws=[0],
    )


def _train_config(spec: dict, memory: str, smoke: bool) -> tuple[dict, object]:
    """The configuration's trainer settings (as reported) and its TrainConfig (seed 0: the same draws in all)."""
    from hvtune.config.settings import TrainConfig

    settings = {
        "lora_rank": spec["rank"],
        "mixed_precision": "no" if smoke else "bf16",
        "base_model_precision": "no_change" if smoke else "bf16",  # smoke: fp32 unless int8 is asked for
        "gradient_checkpointing": False,
        **MEMORY[memory],
    }
    if smoke and settings.get("group_offload_use_stream"):
        settings["group_offload_use_stream"] = False  # streams need an accelerator; same code otherwise
    return settings, TrainConfig(**settings, seed=0)


def _prepare(transformer, cfg, device, result: dict) -> tuple[list, object]:
    """The trainer's set-up on `transformer`: base precision, checkpointing and offload, LoRA, the optimizer."""
    import torch

    from hvtune.config.kernels import attention_device_problem
    from hvtune.train.base_model import prepare_base
    from hvtune.train.compile import compile_transformer
    from hvtune.train.lora import add_lora
    from hvtune.train.optim import build_optimizer

    machine = "cpu" if device.type == "cpu" else "rocm" if torch.version.hip else "cuda"
    if problem := attention_device_problem(cfg.attention_mechanism, cfg.sageattention_usage, machine):
        raise RuntimeError(f"skipped: attention_mechanism {cfg.attention_mechanism}: {problem}")
    t0 = time.perf_counter()
    transformer.requires_grad_(False)
    prepare_base(transformer, cfg, device)
    torch.manual_seed(0)
    add_lora(transformer, cfg)
    compile_transformer(transformer, cfg, print)  # dynamo_backend: as the trainer, after the LoRA (lazy: step 1)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    result["trainable_params"] = sum(p.numel() for p in params)
    result["prepare_s"] = round(time.perf_counter() - t0, 2)
    return params, optimizer


def _time_steps(spec: dict, step, device, result: dict) -> float:
    """Warm-up then timed steps (synchronised around each); records times, losses and peaks; returns the median
    s/step."""
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        result["setup_peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["resident_after_setup_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    times, losses, warmup = [], [], []
    for i in range(spec["warmup"] + spec["steps"]):
        _sync(device)
        t0 = time.perf_counter()
        loss = step(i)
        _sync(device)
        (times if i >= spec["warmup"] else warmup).append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    result["warmup_times_s"] = [round(t, 2) for t in warmup]  # compiled configurations: the compile is in here
    result.update(_peak(device))
    result["step_times_s"] = [round(t, 4) for t in times]
    s_step = sorted(times)[len(times) // 2]
    result["s_per_step"] = round(s_step, 4)
    result["losses"] = [round(v, 5) for v in losses]
    return s_step


def _throughput(model_cfg: dict, n_video: int, text: dict, s_step: float, peak: float | None, params: int) -> dict:
    """Tokens/s, FLOPs and MFU of a step of `s_step` seconds (the analytic FLOP model)."""
    flops = forward_flops(model_cfg, n_video, text["qwen"], text["byt5"], text["image"])
    train_flops = 3 * flops["total"]
    return {
        "seq_len": flops["seq_len"],
        "tokens_per_s": round(flops["seq_len"] / s_step, 1),
        "video_tokens_per_s": round(n_video / s_step, 1),
        "train_tflop_per_step": round(train_flops / 1e12, 2),
        "attention_share": round(flops["attention"] / flops["total"], 3),
        "naive_6NS_tflop": round(6 * params * flops["seq_len"] / 1e12, 2),
        "achieved_tflops": round(train_flops / s_step / 1e12, 2),
        "mfu": round(train_flops / s_step / (peak * 1e12), 4) if peak else None,
    }


def run_config(spec: dict) -> dict:
    """One configuration, in this (sub)process: build, prepare like the trainer, time the trainer's training step."""
    import torch
    from diffusers import HunyuanVideo15Transformer3DModel  # noqa: F401  (imported here: build_s is the build alone)

    from hvtune.train.objective import schedule_options
    from hvtune.train.step import training_step

    smoke = spec["smoke"]
    device = torch.device("cpu" if smoke else "cuda")
    memory, mode = parse_config(spec["config"])
    model_cfg = dict(SMOKE_CONFIG if smoke else REAL_CONFIG)
    if not smoke:
        model_cfg["target_size"] = FLAVOURS[f"t2v-{spec['res']}"].target_size
    latents = latent_shape(*(SMOKE_RESOLUTION if smoke else RESOLUTIONS[spec["res"]]))
    text = text_layout(mode, smoke, spec["caption_tokens"])
    n_video = latents[1] * latents[2] * latents[3]
    settings, cfg = _train_config(spec, memory, smoke)
    result = {
        "config": spec["config"],
        "memory": memory,
        "text_mode": mode,
        "res": spec["res"],
        "settings": dict(settings),
        "latents": [1, *latents],
        "tokens": {"video": n_video, **text},
    }
    t0 = time.perf_counter()
    torch.manual_seed(0)  # the same random weights in every configuration: their losses are comparable
    transformer = build_transformer(model_cfg, device, torch.float32 if smoke else torch.bfloat16)
    _sync(device)
    result["build_s"] = round(time.perf_counter() - t0, 2)
    result["params"] = sum(p.numel() for p in transformer.parameters())
    params, optimizer = _prepare(transformer, cfg, device, result)
    batch = make_batch(model_cfg, latents, text, (SMOKE_TEXT if smoke else PIPELINE_TEXT)["qwen_pad"])
    image_shape = (text["image"], model_cfg["image_embed_dim"])
    step_args = dict(rank=0, empty=None, image_embed_shape=image_shape, device=device, schedule=schedule_options(cfg))
    with step_accelerator(cfg.mixed_precision, cpu=smoke) as accelerator:

        def step(i: int):
            return training_step(accelerator, transformer, optimizer, params, batch, cfg, epoch=0, index=i, **step_args)

        s_step = _time_steps(spec, step, device, result)
        result.update(_throughput(model_cfg, n_video, text, s_step, spec.get("peak_tflops"), result["params"]))
        if not smoke and mode == "maskfree":  # plan's prediction for the same step, beside the measurement
            result.update(_plan_prediction(cfg, spec["res"], text, device))
        if spec.get("backend_probe", True):
            result["sdpa_in_model"] = _model_backend_probe(transformer, batch, cfg, accelerator, image_shape, device)
    return result


def _plan_prediction(cfg, res: str, text: dict, device) -> dict:
    """`hvtune plan` for this configuration (maskfree layout: no padding, which plan's shapes describe): the peak it
    predicts for torch.cuda.max_memory_allocated (no allowances) and s/step on this card, to calibrate plan."""
    import torch

    from hvtune.model.architectures import find_gpu
    from hvtune.plan.prediction import GiB, simulate
    from hvtune.plan.simulate import StepShape

    frames, height, width = RESOLUTIONS[res]
    shape = StepShape(1, frames, width, height, "t2v", qwen_tokens=text["qwen"], byt5_tokens=text["byt5"])
    started = time.perf_counter()
    # the benchmark measures training steps only: plan's validation round is not part of what it compares
    plan = simulate(cfg.model_copy(update={"model_flavour": f"t2v-{res}", "validation_disable": True}), shape)
    gpu = find_gpu(torch.cuda.get_device_name(device))
    measured = torch.cuda.max_memory_allocated() / GiB
    predicted = plan.tracked_peak / GiB
    return {
        "plan_peak_gib": round(predicted, 2),
        "plan_peak_ratio": round(predicted / measured, 3) if measured else None,
        "plan_s_per_step": round(plan.seconds_per_step(gpu), 2) if gpu else None,
        "plan_seconds": round(time.perf_counter() - started, 1),
    }


def _model_backend_probe(transformer, batch, cfg, accelerator, image_shape, device) -> dict:
    """One extra forward (grad enabled, not timed) under the profiler: which aten SDPA op the model runs, and what
    attn_mask the attention call gets."""
    from torch.profiler import ProfilerActivity, profile

    from hvtune.train.objective import schedule_options, training_loss

    with SDPARecorder() as rec, profile(activities=[ProfilerActivity.CPU]) as prof, accelerator.autocast():
        loss, _ = training_loss(
            transformer,
            batch,
            seed=0,
            epoch=0,
            **schedule_options(cfg),
            empty_prompt=None,
            image_embed_shape=image_shape,
            device=device,
        )
    del loss
    return {"ops": SDPARecorder.backends(prof), **rec.blocks(transformer.config.num_refiner_layers)}


def run_sdpa(spec: dict) -> dict:
    """SDPA at the real attention shape: default choice and each backend alone, no mask / dense masks."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    smoke = spec["smoke"]
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    model_cfg = SMOKE_CONFIG if smoke else REAL_CONFIG
    heads, dim = model_cfg["num_attention_heads"], model_cfg["attention_head_dim"]
    frames, height, width = SMOKE_RESOLUTION if smoke else RESOLUTIONS[spec["res"]]
    _, f, h, w = latent_shape(frames, height, width)
    video = f * h * w
    layouts = {m: text_layout(m, smoke, spec["caption_tokens"]) for m in TEXT_MODES}
    seq = {m: video + t["qwen"] + t["byt5"] + t["image"] for m, t in layouts.items()}
    valid = {m: video + t["qwen_valid"] + t["byt5_valid"] for m, t in layouts.items()}  # t2v: image tokens masked
    iters = 1 if smoke else spec.get("sdpa_iters", 3)

    def mask_for(seq, valid):
        # exactly what HunyuanVideo15AttnProcessor2_0 builds: m_i & m_j, (B, 1, S, S) bool
        m = torch.zeros(1, seq, dtype=torch.bool, device=device)
        m[:, :valid] = True
        m1 = m.view(1, 1, 1, seq).repeat(1, 1, seq, 1)
        return m1 & m1.transpose(2, 3)

    cases = [
        ("minimal (maskfree), attn_mask=None", seq["maskfree"], None),
        ("minimal, dense all-True mask (diffusers' processor)", seq["maskfree"], valid["maskfree"]),
        ("text trimmed only, dense padding mask", seq["trimmed"], valid["trimmed"]),
        ("pipeline (padded), dense padding mask", seq["padded"], valid["padded"]),
    ]
    backends = [
        ("default", None),
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("math", SDPBackend.MATH),
    ]
    out = []
    for label, n, n_valid in cases:
        row = {"case": label, "seq_len": n, "mask_gib": None}
        try:
            mask = None if n_valid is None else mask_for(n, n_valid)
            row["mask_gib"] = None if mask is None else round(mask.numel() / 2**30, 2)
            q, k, v = (torch.randn(1, heads, n, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        except torch.OutOfMemoryError:
            row["error"] = "OOM allocating inputs"
            out.append(row)
            continue
        for name, backend in backends:
            caught = []
            try:
                ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
                with ctx, warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                        o.sum().backward()
                    _sync(device)
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                        o.sum().backward()
                    _sync(device)
                ms = (time.perf_counter() - t0) / iters * 1e3
                tflops = 3 * 4 * n * n * dim * heads / (ms / 1e3) / 1e12  # fwd 4*S^2*d, bwd 2x
                row[name] = {
                    "ok": True,
                    "ran": sorted(SDPARecorder.backends(prof)),
                    "fwd_bwd_ms": round(ms, 2),
                    "tflops": round(tflops, 1),
                }
            except torch.OutOfMemoryError:
                row[name] = {"ok": False, "error": "OOM"}
            except RuntimeError as e:
                # PyTorch says why each kernel was rejected in warnings ("... does not support ... attn_mask")
                reasons = [str(w.message).strip().splitlines()[0][:200] for w in caught]
                row[name] = {"ok": False, "error": str(e).strip().splitlines()[0][:200], "reasons": reasons[:6]}
            finally:
                q.grad = k.grad = v.grad = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        out.append(row)
        del q, k, v, mask
    return {
        "res": spec["res"],
        "heads": heads,
        "head_dim": dim,
        "dtype": str(dtype),
        "cases": out,
        "bf16_matmul_tflops": None if smoke else _matmul_tflops(device),
    }


def _matmul_tflops(device, n: int = 8192, iters: int = 10) -> float:
    """What a plain 8192^3 bf16 matmul reaches on this card: the ceiling MFU is measured against in practice."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return round(2 * n**3 * iters / (time.perf_counter() - t0) / 1e12, 1)


def worker_main(task: str, spec_json: str, result_path: str) -> int:
    spec = json.loads(spec_json)
    try:
        fn = {"probe": probe_device, "config": run_config, "sdpa": run_sdpa}[task]
        result = {"status": "ok", **fn(spec)}
        if task != "probe":
            result["device"] = probe_device(spec)
    except Exception as e:  # reported, not raised: the parent records it and goes on
        import traceback

        oom = type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()
        result = {
            "status": "oom" if oom else "error",
            "error": f"{type(e).__name__}: {str(e)[:500]}",
            "traceback": traceback.format_exc()[-3000:],
        }
        try:
            import torch

            if torch.cuda.is_available():
                result["peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except Exception:
            pass
    Path(result_path).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------------------- parent


def _spawn(task: str, spec: dict, timeout: float, threads: int | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="hvtune-bench-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", task, json.dumps(spec), str(result_path)]
        env = subprocess_env(PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
        if threads:  # smoke runs 2 workers on 2 cores: oversubscribed tiny ops run 20x slower
            env.setdefault("OMP_NUM_THREADS", str(threads))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as e:
            tail = (e.stderr or b"")[-1500:]
            return {
                "status": "timeout",
                "error": f"over {timeout:.0f} s",
                "stderr_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail,
            }
        wall = round(time.perf_counter() - t0, 1)
        if result_path.exists():
            result = json.loads(result_path.read_text())
        else:  # killed (host OOM, segfault): no result written
            result = {"status": "crashed", "error": f"exit code {proc.returncode}"}
        result["process_wall_s"] = wall
        if result["status"] != "ok":
            result["stderr_tail"] = proc.stderr[-1500:]
        return result


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return peak_bf16_tflops(name)


def _row(r: dict) -> list:
    if r.get("status") != "ok":
        return [
            r["res"],
            r["config"],
            r.get("status"),
            "-",
            r.get("peak_vram_gib", "-"),
            "-",
            "-",
            "-",
            "-",
            (r.get("error") or "")[:60],
        ]
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    sdpa = ",".join((r.get("sdpa_in_model") or {}).get("ops", {}) or ["?"])
    return [
        r["res"],
        r["config"],
        "ok",
        r["s_per_step"],
        r.get("peak_vram_gib", "-"),
        r.get("plan_peak_gib", "-"),
        r["seq_len"],
        r["tokens_per_s"],
        mfu,
        sdpa,
    ]


HEADER = [
    "res",
    "config",
    "status",
    "s/step",
    "peak VRAM GiB",
    "plan GiB",
    "S tokens",
    "tokens/s",
    "MFU",
    "SDPA in model",
]
WIDTHS = [5, 30, 7, 8, 13, 8, 8, 10, 6, 24]


def _line(cells: list) -> str:
    """One row of the configuration table, fixed widths so rows can be printed as they finish."""
    return "  ".join(
        str(c).rjust(w) if i != 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, WIDTHS, strict=True))
    )


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker_main(*argv[1:4])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU, same code end to end")
    ap.add_argument("--res", default="480p,720p", help="comma list of 480p, 720p")
    ap.add_argument(
        "--configs",
        help="comma list of MEMORY[:TEXT]; default per resolution (see DEFAULT_CONFIGS); "
        f"MEMORY in {', '.join(MEMORY)}; TEXT in {', '.join(TEXT_MODES)}",
    )
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 3 at 480p, 2 at 720p, 2 smoke)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument(
        "--caption-tokens",
        type=int,
        default=DEFAULT_CAPTION_TOKENS,
        help="Qwen valid tokens per caption incl. the 5 template tokens",
    )
    ap.add_argument("--timeout", type=float, default=None, help="seconds per configuration (default 480, smoke 120)")
    ap.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="stop starting configurations after this many seconds in total (whole-command limits)",
    )
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card, for MFU")
    ap.add_argument("--no-sdpa", action="store_true", help="skip the SDPA backend probe")
    ap.add_argument("--no-backend-probe", action="store_true", help="skip the per-configuration profiled forward")
    ap.add_argument("--jobs", type=int, default=None, help="configurations at once (default 1; 2 with --cpu-smoke)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/gpu-<device>.json)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    smoke = args.cpu_smoke
    timeout = args.timeout or (120 if smoke else 480)

    if smoke:
        device = None  # taken from the first worker (each reports its device): one process fewer on 2 cores
    else:
        device = _spawn("probe", {}, 120)
        if device.get("status") != "ok":
            print(f"device probe failed: {device.get('error')}\n{device.get('stderr_tail', '')}", file=sys.stderr)
            return 1
        if device["device"] != "cuda":
            print("no CUDA device: run with --cpu-smoke on a machine without a GPU", file=sys.stderr)
            return 2
    peak = None if smoke else _peak_tflops(device["name"], args.peak_tflops)
    resolutions = ["smoke"] if smoke else [r.strip() for r in args.res.split(",") if r.strip()]
    for r in resolutions:
        if r != "smoke" and r not in RESOLUTIONS:
            raise SystemExit(f"unknown resolution {r!r}; one of {', '.join(RESOLUTIONS)}")

    slug = "cpu-smoke" if smoke else _slug(device["name"])
    out = Path(args.out) if args.out else RESULTS / f"gpu-{slug}.json"
    previous = json.loads(out.read_text()) if out.exists() and not smoke else {}
    results = {(r["res"], r["config"]): r for r in previous.get("results", [])}
    sdpa = {s["res"]: s for s in previous.get("sdpa", [])}

    if device is not None:
        print(
            f"device: {device['name']}, peak bf16 {peak or 'n/a'} TFLOP/s, torch {device['versions']['torch']}, "
            f"diffusers {device['versions']['diffusers']}",
            flush=True,
        )
    jobs = []  # (kind, res, name, spec)
    for res in resolutions:
        names = args.configs.split(",") if args.configs else (SMOKE_CONFIGS if smoke else DEFAULT_CONFIGS[res])
        steps = args.steps or (2 if smoke or res == "720p" else 3)
        if not args.no_sdpa:  # first: short, and never cut by --deadline
            jobs.append(("sdpa", res, "sdpa", {"smoke": smoke, "res": res, "caption_tokens": args.caption_tokens}))
        for name in (n.strip() for n in names):
            parse_config(name)
            jobs.append(
                (
                    "config",
                    res,
                    name,
                    {
                        "smoke": smoke,
                        "res": res,
                        "config": name,
                        "steps": steps,
                        "warmup": args.warmup,
                        "rank": args.rank,
                        "caption_tokens": args.caption_tokens,
                        "peak_tflops": peak,
                        "backend_probe": not args.no_backend_probe,
                    },
                )
            )

    parallel = args.jobs or (2 if smoke else 1)

    def launch(job):
        kind, spec = job[0], job[3]
        if args.deadline and time.perf_counter() - started > args.deadline:
            return job, {"status": "skipped", "error": "deadline"}
        return job, _spawn(kind, spec, timeout, threads=1 if smoke and parallel > 1 else None)

    print(_line(HEADER), flush=True)
    print(_line(["-" * w for w in WIDTHS]), flush=True)
    # GPU: one process at a time (clean peak memory, no contention); smoke: 2 at once (imports dominate on 2 cores)
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for (kind, res, name, spec), r in pool.map(launch, jobs):
            reported = r.pop("device", None)
            if device is None and reported:
                device = reported
            if kind == "sdpa":
                sdpa[res] = {**r, "res": res}
                continue
            r.update(
                res=res,
                config=name,
                steps=spec["steps"],
                warmup=spec["warmup"],
                rank=spec["rank"],
                measured_at=time.strftime("%Y-%m-%d %H:%M:%S"),
            )
            results[(res, name)] = r
            print(_line(_row(r)), flush=True)
    if device is None:
        device = {"device": "unknown", "name": "unknown"}
    device["peak_bf16_tflops"] = peak

    for res, s in sdpa.items():
        if res not in resolutions:
            continue
        if s.get("status") != "ok":
            print(f"\nSDPA probe {res}: {s.get('status')} {s.get('error', '')}")
            continue
        rows = []
        for c in s["cases"]:
            for b in ("default", "flash", "efficient", "cudnn", "math"):
                v = c.get(b)
                if v is None:
                    continue
                rows.append(
                    [
                        res,
                        c["case"],
                        c["seq_len"],
                        b,
                        ",".join(v.get("ran", [])) if v["ok"] else "-",
                        v.get("fwd_bwd_ms", "-"),
                        v.get("tflops", "-"),
                        "" if v["ok"] else (v.get("reasons") or [v["error"]])[0][:90],
                    ]
                )
        print(f"\nbf16 8192^3 matmul on this card: {s.get('bf16_matmul_tflops')} TFLOP/s")
        print(table(rows, ["res", "SDPA case", "S", "allowed", "ran", "fwd+bwd ms", "TFLOP/s", "error"]))

    doc = {
        "command": "python benchmarks/bench_gpu.py " + " ".join(argv),
        "device": device,
        "model": {
            "source": "huggingface/diffusers scripts/convert_hunyuan_video1_5_to_diffusers.py "
            "TRANSFORMER_CONFIGS (480p_t2v, 720p_t2v)",
            "config": SMOKE_CONFIG if smoke else REAL_CONFIG,
            "target_size": {res: FLAVOURS[f"t2v-{res}"].target_size for res in RESOLUTIONS},
            "resolutions": {"smoke": SMOKE_RESOLUTION} if smoke else RESOLUTIONS,
        },
        "flops_formula": "forward = sum over blocks of 24*d^2 per token (each token through its stream's q,k,v,out,"
        "MLP) + 4*S^2*d (joint attention) + refiner/embedders; train step = 3 x forward "
        "(checkpoint recompute not counted); MFU = train FLOPs / s_per_step / peak_bf16",
        "text_modes": {m: text_layout(m, smoke, args.caption_tokens) for m in TEXT_MODES},
        "env": {"PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")},
        "results": sorted(results.values(), key=lambda r: (r["res"], r["config"])),
        "sdpa": sorted(sdpa.values(), key=lambda s: s["res"]),
    }
    write_result(out, doc)
    print(f"\nwrote {out} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
