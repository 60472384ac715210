"""What `hvtune plan` prints: the configured setting's plan, the sweep's table, the one-line verdict for a card."""

from __future__ import annotations

import math
from typing import Any

from hvtune.config.settings import ResolvedConfig
from hvtune.errors import UserError
from hvtune.model.architectures import GPU, GPUS, find_gpu
from hvtune.plan.prediction import ASSUMED_MFU, MEMORY_KNOBS, GiB, Plan, configured, simulate, sweep
from hvtune.plan.shapes import CAPTION_TOKENS, shape_for


class PlanError(UserError):
    pass


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GB"


def format_plan(plan: Plan, gpu: GPU | None = None) -> str:
    m = plan.memory
    lines = [
        f"plan: {plan.flavour}, largest bucket {plan.shape.label()}, {plan.shape.seq_len:,} tokens "
        f"({plan.shape.video_tokens:,} video), LoRA rank {plan.settings['lora_rank']}, {plan.settings['optimizer']}",
        "  settings: " + ", ".join(f"{k}={plan.settings[k]}" for k in MEMORY_KNOBS),
        f"  predicted peak GPU memory  {gib(plan.gpu_peak)}",
        f"    base weights              {gib(plan.device_weights)}"
        + (f"  (of {gib(m.base_weights)}; the rest offloaded)" if plan.host_weights else "")
        + f"  [{m.base_params:,} parameters]",
        f"    LoRA weights + grads      {gib(m.lora_weights + m.lora_grads)}  [{m.lora_params:,} parameters]",
        f"    optimizer state           {gib(m.optimizer_state)}",
        f"    activations (peak)        {gib(m.activations - m.lora_grads)}"
        f"  (gradient checkpointing {'on' if plan.settings['gradient_checkpointing'] else 'off'})",
    ]
    for name, value in plan.allowances.items():
        lines.append(f"    + {name:<24} {gib(value)}")
    lines.append(f"  predicted host RAM          {gib(plan.host_peak)}")
    if gpu is not None:
        lines.append(
            f"  predicted s/step on {gpu.name}: {plan.seconds_per_step(gpu):.1f} s "
            f"({plan.train_flops / 1e12:,.0f} TFLOP/step at {ASSUMED_MFU:.0%} MFU of {gpu.bf16_tflops:g} TFLOP/s)"
        )
    lines.append(f"  (simulated in {m.seconds:.1f} s)")
    return "\n".join(lines)


def parse_gpu(text: str) -> GPU:
    """A known card name, or a memory size ("24GB", "24"): a card of that size with an H100's speed."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(gb|gib|g)?\s*", text.lower())
    if m:
        # a size alone says nothing about speed: s/step is given for an H100's bf16 peak
        return GPU(f"{float(m.group(1)):g} GB card (H100 speed)", float(m.group(1)), 989.0, 25.0, ())
    gpu = find_gpu(text)
    if gpu is None:
        raise PlanError(f"unknown GPU {text!r}; known: {', '.join(g.name for g in GPUS)}; or a size such as 24GB")
    return gpu


def settings_keys(plan: Plan) -> dict[str, Any]:
    """The config.json keys that select the plan's memory setting."""
    keys = {k: plan.settings[k] for k in MEMORY_KNOBS}
    if keys["enable_group_offload"]:
        keys["group_offload_type"] = "block_level"
    else:
        del keys["group_offload_use_stream"]
    return keys


def format_settings(plan: Plan) -> str:
    s = plan.settings
    parts = ["checkpointing" if s["gradient_checkpointing"] else "no checkpointing"]
    if s["enable_group_offload"]:
        parts.append("group offload" + (" + streams" if s["group_offload_use_stream"] else ""))
    parts.append("int8 base" if s["base_model_precision"] == "int8-torchao" else "bf16 base")
    return ", ".join(parts)


def format_sweep(plans: list[Plan], gpu: GPU) -> str:
    fits = [p for p in plans if p.gpu_peak <= gpu.memory_gib * GiB]
    lines = [f"memory settings on {gpu.name} ({gpu.memory_gib:g} GB), fastest first:"]
    for p in plans:
        mark = "fits" if p in fits else "no  "
        lines.append(
            f"  {mark}  {gib(p.gpu_peak):>9}  {p.seconds_per_step(gpu):6.1f} s/step  host RAM {gib(p.host_peak):>8}"
            f"  {format_settings(p)}"
        )
    if fits:
        best = fits[0]
        lines.append(f"best that fits: {format_settings(best)}; set in config.json:")
        lines += [f'  "{k}": {json_value(v)},' for k, v in settings_keys(best).items()]
    else:
        lines.append(how_to_fit(min(plans, key=lambda p: p.gpu_peak), gpu))
    return "\n".join(lines)


def json_value(v) -> str:
    import json

    return json.dumps(v)


def how_to_fit(plan: Plan, gpu: GPU) -> str:
    """For the smallest setting that does not fit: by how much, and how far frames, resolution or rank would have to
    go (activations grow about linearly with the tokens; LoRA, its gradients and its state linearly with the rank)."""
    over = plan.gpu_peak - gpu.memory_gib * GiB
    act = max(plan.activations - plan.memory.lora_grads, 1)
    lora = plan.memory.lora_weights + plan.memory.lora_grads + plan.memory.optimizer_state
    shape = plan.shape
    keep = max(0.0, 1 - over / act)  # share of the tokens that would fit
    frames = max(1, int(shape.latents[1] * keep - 1) * 4 + 1)
    scale = math.sqrt(keep)
    knobs = {
        "frames": (min(over, act * (1 - 1 / max(shape.latents[1], 1))), f"num_frames {shape.frames} -> {frames}"),
        "resolution": (min(over, act * 0.75), f"resolution x{scale:.2f} ({int(shape.height * scale) // 16 * 16}p)"),
        "rank": (lora * (1 - 4 / max(plan.settings["lora_rank"], 4)), f"lora_rank {plan.settings['lora_rank']} -> 4"),
    }
    best = max(knobs, key=lambda k: knobs[k][0])
    return (
        f"does not fit: the smallest setting ({format_settings(plan)}) needs {gib(plan.gpu_peak)}, "
        f"{gib(over)} more than the {gib(gpu.memory_gib * GiB)} of {gpu.name}. The knob that moves it most is "
        f"{best}: {knobs[best][1]}" + ("" if keep > 0 else " (activations alone do not fit: a larger card is needed)")
    )


def verdict(plan: Plan, gpu: GPU, sweep_plans: list[Plan] | None = None) -> str:
    """One line: does the configured setting fit this card; if not, the fastest setting that does."""
    line = f"predicted peak {gib(plan.gpu_peak)} {'<=' if plan.gpu_peak <= gpu.memory_gib * GiB else '>'} "
    line += f"{gpu.memory_gib:g} GB on this {gpu.name}"
    if plan.gpu_peak <= gpu.memory_gib * GiB or not sweep_plans:
        return line
    fits = [p for p in sweep_plans if p.gpu_peak <= gpu.memory_gib * GiB]
    if not fits:
        return line + "; " + how_to_fit(min(sweep_plans, key=lambda p: p.gpu_peak), gpu)
    best = fits[0]
    keys = ", ".join(f"{k}={json_value(v)}" for k, v in settings_keys(best).items() if plan.settings.get(k) != v)
    return line + f": set {keys} (predicted {gib(best.gpu_peak)})"


def detected_gpu() -> GPU | None:
    """The visible CUDA/ROCm card as a GPU entry (its real memory size), or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    known = find_gpu(props.name)
    speed = known.bf16_tflops if known else 989.0
    link = known.host_link_gbps if known else 25.0
    return GPU(known.name if known else props.name, round(props.total_memory / GiB, 2), speed, link, ())


def gpu_verdict(resolved: ResolvedConfig, gpu: GPU | None = None, caption_tokens: int = CAPTION_TOKENS) -> str:
    """The one line `hvtune check` and the entrypoints print when a GPU is visible (`gpu` defaults to it)."""
    gpu = gpu or detected_gpu()
    if gpu is None:
        return "plan: no GPU visible"
    shape = shape_for(resolved, caption_tokens)
    plan = simulate(resolved.train, shape)
    if plan.gpu_peak <= gpu.memory_gib * GiB:
        return verdict(plan, gpu)
    return verdict(plan, gpu, sweep(resolved.train, shape, gpu, progress=lambda _: None))


def plan_report(
    resolved: ResolvedConfig, gpu_name: str | None, *, caption_tokens: int = CAPTION_TOKENS, verdict_only: bool = False
) -> str:
    """What `hvtune plan` prints: the configured setting's plan, and with a card the sweep (or only the verdict)."""
    gpu = detected_gpu() if gpu_name == "auto" else parse_gpu(gpu_name) if gpu_name else None
    if gpu_name == "auto" and gpu is None:
        return "plan: no GPU visible; name one with --gpu (a card or a size such as 24GB)"
    if verdict_only:
        return gpu_verdict(resolved, gpu, caption_tokens) if gpu else "plan: --verdict needs --gpu"
    shape = shape_for(resolved, caption_tokens)
    plans = sweep(resolved.train, shape, gpu) if gpu is not None else []
    text = format_plan(configured(plans, resolved.train) or simulate(resolved.train, shape), gpu)
    return text + ("\n" + format_sweep(plans, gpu) if plans else "")
