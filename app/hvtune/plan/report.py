"""What `hvtune plan` prints: the configured setting's plan, the sweep's table, the one-line verdict for a card."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from hvtune.config.settings import ResolvedConfig
from hvtune.errors import UserError
from hvtune.model.architectures import GPU, GPUS, find_gpu
from hvtune.plan.dataset import planned_data
from hvtune.plan.disk import disk_lines
from hvtune.plan.phases import PhaseVerdict, decide_phases, gib
from hvtune.plan.prediction import (
    ASSUMED_MFU,
    MEMORY_KNOBS,
    GiB,
    Plan,
    configured,
    simulate,
    speed_assumption,
    speed_options,
    sweep,
)
from hvtune.plan.scale import format_scale, parse_interconnect, scale_sweep
from hvtune.plan.shapes import shape_for, shape_lines


class PlanError(UserError):
    pass


def format_plan(plan: Plan, gpu: GPU | None = None) -> str:
    m = plan.memory
    lines = [
        f"plan: {plan.flavour}, largest bucket {plan.shape.label()}, {plan.shape.seq_len:,} tokens "
        f"({plan.shape.video_tokens:,} video), LoRA rank {plan.settings['lora_rank']}, {plan.settings['optimizer']}",
        *shape_lines(plan.shape),
        "  settings: " + ", ".join(f"{k}={plan.settings[k]}" for k in MEMORY_KNOBS),
        f"  predicted peak GPU memory  {gib(plan.run_peak)}" + _which_peak(plan),
    ]
    if plan.validation is not None:
        lines.append(f"  training step               {gib(plan.gpu_peak)}")
    lines += [
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
    lines += format_validation(plan)
    lines.append(f"  predicted host RAM          {gib(plan.host_peak)}")
    if gpu is not None and gpu.bf16_tflops is None:
        lines.append('  s/step: name the card (--gpu "RTX 4090"); a size alone says nothing about its speed')
    elif gpu is not None:
        lines.append(
            f"  predicted s/step on {gpu.name}: {plan.seconds_per_step(gpu):.1f} s "
            f"({plan.train_flops / 1e12:,.0f} TFLOP/step at {ASSUMED_MFU:.0%} MFU of {gpu.bf16_tflops:g} TFLOP/s)"
        )
        if assumption := speed_assumption(plan.settings):
            lines.append(f"    {assumption}")
    validated = f" + validation {plan.validation.seconds:.1f} s" if plan.validation else ""
    lines.append(f"  (simulated in {m.seconds:.1f} s{validated})")
    return "\n".join(lines)


def _which_peak(plan: Plan) -> str:
    if plan.validation is None:
        return "  (validation off)"
    if plan.validation_binds:
        return f"  (validation; the training step {gib(plan.gpu_peak)})"
    return f"  (the training step; validation {gib(plan.validation_peak())})"


def format_validation(plan: Plan) -> list[str]:
    """The validation round's part of the plan: its shape, what stays resident, the forward's and the decode's peaks."""
    v = plan.validation
    if v is None:
        return []
    m, s = plan.memory, v.shape
    _, f, h, w = s.latents
    tiling = plan.settings["vae_enable_tiling"]
    other = f"vae_enable_tiling={json_value(not tiling)}: {gib(plan.validation_decode(not tiling))}"
    if plan.settings.get("vae_tiling_unset"):
        other = f"vae_enable_tiling unset: hvtune tiles; untiled: {gib(plan.validation_decode(False))}"
    away = "; the transformer moved to the CPU first (enable_model_cpu_offload)" if plan.decode_offload else ""
    tracked = max(plan.validation_forward, plan.validation_decode())
    return [
        f"  validation                  {gib(plan.validation_peak())}  {s.label()} ({f}x{h}x{w} latents, "
        f"{s.video_tokens:,} tokens), {s.steps} steps x {2 if s.guidance > 1 else 1} forwards, no gradients",
        f"    resident                  {gib(plan.validation_resident)}  (base {gib(plan.device_weights)} + LoRA "
        f"{gib(m.lora_weights)} + optimizer state {gib(m.optimizer_state)} + VAE decoder {gib(v.vae_weights)} "
        f"{v.dtype})",
        f"    transformer forward peak  {gib(plan.validation_forward)}  (+{gib(v.forward_extra)})",
        f"    VAE decode peak           {gib(plan.validation_decode())}  (tiling {'on' if tiling else 'off'}: "
        f"+{gib(v.decode_extra())}{away}; {other})",
        f"    + allowances              {gib(plan.validation_peak() - tracked)}  (CUDA context, fragmentation)",
    ]


def parse_gpu(text: str) -> GPU:
    """A known card name, or a memory size ("24GB", "24GiB", "24"): the size on the box, which vendors print in GiB
    (an RTX 4090's "24 GB" is 24 GiB); a size alone has no speed, so plan gives memory only."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(gb|gib|g)?\s*", text.lower())
    if m:
        return GPU(f"{float(m.group(1)):g} GiB card", float(m.group(1)), None, 25.0, ())
    gpu = find_gpu(text)
    if gpu is None:
        raise PlanError(f"unknown GPU {text!r}; known: {', '.join(g.name for g in GPUS)}; or a size such as 24GB")
    return gpu


def settings_keys(plan: Plan) -> dict[str, Any]:
    """The config.json keys that select the plan's memory setting (and the VAE tiling validation needs)."""
    keys = {k: plan.settings[k] for k in MEMORY_KNOBS}
    if keys["enable_group_offload"]:
        keys["group_offload_type"] = "block_level"
    else:
        del keys["group_offload_use_stream"]
    if plan.validation is not None and plan.settings["vae_enable_tiling"]:
        keys["vae_enable_tiling"] = True
    return keys


def fitting(plans: list[Plan], gpu: GPU) -> list[Plan]:
    """The plans that fit `gpu`, in their order; one whose validation fits only with the VAE tiled is taken tiled."""
    room = gpu.memory_gib * GiB
    fits = []
    for p in plans:
        if p.run_peak <= room:
            fits.append(p)
        elif p.validation is not None and not p.settings["vae_enable_tiling"] and p.tiled().run_peak <= room:
            fits.append(p.tiled())
    return fits


BASE_NAMES = {"int8-torchao": "int8 base", "fp8wo-torchao": "fp8 weight-only base", "fp8-torchao": "fp8 base"}


def format_settings(plan: Plan) -> str:
    s = plan.settings
    parts = ["checkpointing" if s["gradient_checkpointing"] else "no checkpointing"]
    if s["enable_group_offload"]:
        parts.append("group offload" + (" + streams" if s["group_offload_use_stream"] else ""))
    parts.append(BASE_NAMES.get(s["base_model_precision"], "bf16 base"))
    if plan.validation is not None and s["vae_enable_tiling"]:
        parts.append("VAE tiling")
    return ", ".join(parts)


def format_sweep(plans: list[Plan], gpu: GPU) -> str:
    fits = fitting(plans, gpu)
    validation = plans[0].validation is not None if plans else False
    head = f"memory settings on {gpu.name} ({gpu.memory_gib:g} GiB), fastest first"
    if validation:
        head += " (peak: the larger of the training step and validation; tile: fits with vae_enable_tiling=true)"
    lines = [head + ":"]
    for p in plans:
        mark = "fits" if p.run_peak <= gpu.memory_gib * GiB else "tile" if fitting([p], gpu) else "no  "
        shown = fitting([p], gpu)[0] if mark == "tile" else p  # a "tile" row shows the tiled setting
        which = (" (validation)" if shown.validation_binds else " (step)      ") if validation else ""
        speed = f"{p.seconds_per_step(gpu):6.1f} s/step" if gpu.bf16_tflops else "  (no card speed)"
        peak, host = gib(shown.run_peak), gib(p.host_peak)
        lines.append(f"  {mark}  {peak:>10}{which}  {speed}  host RAM {host:>9}  {format_settings(shown)}")
    if fits:
        best = fits[0]
        lines.append(f"best that fits: {format_settings(best)}; set in config.json:")
        lines += [f'  "{k}": {json_value(v)},' for k, v in settings_keys(best).items()]
        lines.append(speed_options(gpu))
    else:
        lines.append(how_to_fit(smallest(plans), gpu))
    return "\n".join(lines)


def smallest(plans: list[Plan]) -> Plan:
    """The setting that needs the least GPU memory (its VAE tiled when that is smaller)."""
    return min([*plans, *(p.tiled() for p in plans if p.validation is not None)], key=lambda p: p.run_peak)


def json_value(v) -> str:
    import json

    return json.dumps(v)


def how_to_fit(plan: Plan, gpu: GPU) -> str:
    """For the smallest setting that does not fit: by how much, and how far frames, resolution or rank would have to
    go (activations grow about linearly with the tokens; LoRA, its gradients and its state linearly with the rank)."""
    if plan.validation_binds:
        return how_to_fit_validation(plan, gpu)
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


def how_to_fit_validation(plan: Plan, gpu: GPU) -> str:
    """When validation is what does not fit: by how much, and the validation knobs that move it (VAE tiling, the
    transformer off the GPU for the decode, fewer validation frames; the decode grows about linearly with them)."""
    room = gpu.memory_gib * GiB
    v, s = plan.validation, plan.validation.shape
    part = "the VAE decode" if plan.validation_decode() >= plan.validation_forward else "the transformer forward"
    text = (
        f"does not fit: validation ({s.label()}, {part}) needs {gib(plan.run_peak)}, "
        f"{gib(plan.run_peak - room)} more than the {gib(room)} of {gpu.name} (the training step needs "
        f"{gib(plan.gpu_peak)})."
    )
    tiling, offload = plan.settings["vae_enable_tiling"], plan.decode_offload
    can_offload = not offload and not plan.settings["enable_group_offload"]  # the config refuses both offloads
    fixes = [("", tiling, offload)]
    fixes += [("vae_enable_tiling=true", True, offload)] if not tiling else []
    fixes += [("enable_model_cpu_offload=true", tiling, True)] if can_offload else []
    fixes += (
        [("vae_enable_tiling=true, enable_model_cpu_offload=true", True, True)] if can_offload and not tiling else []
    )
    named = [(keys, plan.validation_peak(t, o), t, o) for keys, t, o in fixes]
    fit = [f for f in named[1:] if max(f[1], plan.gpu_peak) <= room]
    if fit:
        return text + " Set " + "; or ".join(f"{k} (validation {gib(p)})" for k, p, _, _ in fit)
    keys, peak, t, o = min(named, key=lambda f: f[1])
    decode = plan.validation_decode(t, o)
    keep = max(0.0, 1 - (max(peak, plan.gpu_peak) - room) / max(v.decode_extra(t), 1))
    frames = max(1, int(s.latents[1] * keep - 1) * 4 + 1)
    fewer = (
        f"validation_num_video_frames {s.frames} -> {frames}" if keep > 0 and decode > plan.validation_forward else ""
    )
    steps = [x for x in (keys, fewer) if x]
    return text + (" Set " + ", ".join(steps) if steps else "") + "; or validation_disable=true"


def verdict(plan: Plan, gpu: GPU, sweep_plans: list[Plan] | None = None) -> str:
    """One line: does the configured setting fit this card (training step and validation); if not, the fastest
    setting that does."""
    line = f"predicted peak {gib(plan.run_peak)} {'<=' if plan.run_peak <= gpu.memory_gib * GiB else '>'} "
    line += f"{gpu.memory_gib:g} GiB on this {gpu.name}"
    if plan.run_peak <= gpu.memory_gib * GiB:
        return line
    if not sweep_plans:
        return line + ("; " + how_to_fit_validation(plan, gpu) if plan.validation_binds else "")
    fits = fitting(sweep_plans, gpu)
    if not fits:
        return line + "; " + how_to_fit(smallest(sweep_plans), gpu)
    best = fits[0]
    keys = ", ".join(f"{k}={json_value(v)}" for k, v in settings_keys(best).items() if plan.settings.get(k) != v)
    return line + f": set {keys} (predicted {gib(best.run_peak)})"


def detected_gpu() -> GPU | None:
    """The visible CUDA/ROCm card as a GPU entry (its real memory size), or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    known = find_gpu(props.name)
    speed = known.bf16_tflops if known else None  # an unknown card: memory only, no s/step
    link = known.host_link_gbps if known else 25.0
    return GPU(known.name if known else props.name, round(props.total_memory / GiB, 2), speed, link, ())


def gpu_verdict(resolved: ResolvedConfig, gpu: GPU | None = None, caption_tokens: int | None = None) -> str:
    """What `hvtune check` and the entrypoints print when a GPU is visible (`gpu` defaults to it): the one-line
    verdict, then every phase of the run on that card (`phases.decide_phases`, the pre-flight's own)."""
    gpu = gpu or detected_gpu()
    if gpu is None:
        return "plan: no GPU visible"
    plan, decided, plans = phase_verdict(resolved, gpu, caption_tokens)
    return "\n".join([verdict(plan, gpu, plans), *decided.lines()])


def phase_verdict(
    resolved: ResolvedConfig, gpu: GPU, caption_tokens: int | None = None, shape=None, plan: Plan | None = None
) -> tuple[Plan, PhaseVerdict, list[Plan]]:
    """The configured setting's plan, every phase's verdict on `gpu`, and the sweep when the training step does not
    fit (it names the keys that make it fit)."""
    shape = shape or shape_for(resolved, caption_tokens)
    plan = plan or simulate(resolved.train, shape)
    unset = {k for k in ("enable_model_cpu_offload",) if resolved.sources.get(k, "default") == "default"}
    step_fix, plans = None, []
    if plan.gpu_peak > gpu.memory_gib * GiB:
        plans = sweep(resolved.train, shape, gpu, progress=lambda _: None, known=plan)
        fits = fitting(plans, gpu)
        if fits:
            step_fix = ", ".join(f"{k}={json_value(v)}" for k, v in settings_keys(fits[0]).items())
    return plan, decide_phases(plan, gpu, unset, step_fix), plans


def preflight(resolved: ResolvedConfig, print_=print) -> ResolvedConfig:
    """`hvtune train`'s check before step 1 with a GPU visible: every phase of this run on this card. A phase that
    does not fit is adapted where the config leaves it to hvtune, else refused (PlanError, one line). Skipped
    without a GPU (the CPU has no card to fit)."""
    import time

    gpu = detected_gpu()
    if gpu is None:
        return resolved
    started = time.perf_counter()
    _, decided, _ = phase_verdict(resolved, gpu)
    for note in decided.notes:
        print_(note)
    if decided.refusal:
        raise PlanError(decided.refusal)
    if decided.updates:
        resolved = dataclasses.replace(resolved, train=resolved.train.model_copy(update=decided.updates))
    print_(f"pre-flight: every phase fits this {gpu.name} ({time.perf_counter() - started:.0f} s)")
    return resolved


def plan_report(
    resolved: ResolvedConfig,
    gpu_name: str | None,
    *,
    caption_tokens: int | None = None,
    verdict_only: bool = False,
    gpus: int | None = None,
    interconnect: str | None = None,
) -> str:
    """What `hvtune plan` prints: the configured setting's plan, and with a card the sweep (or only the verdict);
    with `gpus`, that plan over up to that many GPUs (plan.scale)."""
    gpu = detected_gpu() if gpu_name == "auto" else parse_gpu(gpu_name) if gpu_name else None
    if gpu_name == "auto" and gpu is None:
        return "plan: no GPU visible; name one with --gpu (a card or a size such as 24GB)"
    if verdict_only:
        return gpu_verdict(resolved, gpu, caption_tokens) if gpu else "plan: --verdict needs --gpu"
    link = parse_interconnect(interconnect, gpu, gpus) if gpus is not None else None  # before minutes of simulation
    data = planned_data(resolved)
    shape = shape_for(resolved, caption_tokens, data)
    plans = sweep(resolved.train, shape, gpu) if gpu is not None else []
    plan = configured(plans, resolved.train) or simulate(resolved.train, shape)
    text = format_plan(plan, gpu)
    if gpu is not None:
        text += "\n" + "\n".join(phase_verdict(resolved, gpu, caption_tokens, shape, plan)[1].lines())
    text += "\n" + "\n".join(disk_lines(resolved, data, shape))
    if plans:
        text += "\n" + format_sweep(plans, gpu)
    if gpus is not None and link is not None:
        text += "\n" + format_scale(scale_sweep(plan, gpus, gpu, link), gpu, link)
    return text
