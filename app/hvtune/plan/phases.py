"""Every phase of a run on one card, decided before step 1: the one verdict `hvtune check`, `hvtune plan` and
`hvtune train`'s pre-flight share.

A run's phases: the training steps; each validation round (the transformer sampling at the validation size and frame
count, two forwards per step with CFG, then the VAE decode); the EMA's validation round (the EMA copy of the LoRA and
the trained weights' backup are resident too); the checkpoint writes and the final exports (the training state
without activations; the copies go to host memory). Each phase's predicted peak is its tracked bytes plus the
allowances (CUDA context, fragmentation) of `prediction.Plan`.

A phase that does not fit is adapted when the config leaves it to hvtune (`vae_enable_tiling` unset: the decode
tiles; `enable_model_cpu_offload` unset: the transformer leaves the GPU for the decode), else refused before any
training, in one line naming the phase, its predicted peak, the card and the key that makes it fit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hvtune.model.architectures import GPU
from hvtune.plan.prediction import GiB, Plan


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


@dataclass(frozen=True)
class Phase:
    name: str
    peak: int  # predicted bytes, allowances included


def _with_allowances(tracked: int) -> int:
    return tracked + sum(Plan.allowances_for(tracked).values())


def run_phases(plan: Plan) -> list[Phase]:
    """The predicted peak of every phase of the run `plan` describes."""
    m = plan.memory
    ema = m.lora_weights if plan.settings.get("use_ema") else 0  # the EMA copy of the LoRA, float32 like it
    phases = [Phase("training step", plan.gpu_peak + ema)]
    v = plan.validation
    if v is not None:
        cfg_note = ", CFG: 2 forwards per step" if v.shape.guidance > 1 else ""
        sampling = f"validation sampling ({v.shape.label()}, {v.shape.steps} steps{cfg_note})"
        phases.append(Phase(sampling, _with_allowances(plan.validation_forward + ema)))
        phases.append(
            Phase(f"validation decode ({decode_setting(plan)})", _with_allowances(plan.validation_decode() + ema))
        )
        if plan.settings.get("ema_validation"):  # the EMA's weights applied, the trained ones kept aside
            peak = max(plan.validation_forward, plan.validation_decode()) + 2 * ema
            phases.append(Phase("EMA validation", _with_allowances(peak)))
    state = plan.device_weights + m.lora_weights + m.optimizer_state + ema
    phases.append(Phase("checkpoint write", _with_allowances(state)))
    phases.append(Phase("final LoRA export", _with_allowances(state)))
    return phases


def decode_setting(plan: Plan) -> str:
    v = plan.validation
    text = f"{'tiled' if plan.settings['vae_enable_tiling'] else 'untiled'} {v.dtype}"
    return text + (", transformer on the CPU" if plan.decode_offload else "")


@dataclass
class PhaseVerdict:
    """The phases on `gpu`, what was adapted (config updates), and the refusal line when a phase cannot fit."""

    gpu: GPU
    phases: list[Phase]
    updates: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    refusal: str | None = None

    def lines(self) -> list[str]:
        room = self.gpu.memory_gib * GiB
        out = [f"phases on {self.gpu.name} ({self.gpu.memory_gib:g} GiB):"]
        for p in self.phases:
            out.append(f"  {'fits' if p.peak <= room else 'NO  '}  {gib(p.peak):>10}  {p.name}")
        out += self.notes
        if self.refusal:
            out.append(self.refusal)
        return out


def decide_phases(plan: Plan, gpu: GPU, unset: set[str], step_fix: str | None = None) -> PhaseVerdict:
    """The verdict for `plan` on `gpu`. `unset`: the keys the user left to hvtune (`enable_model_cpu_offload` when
    its source is the default; `vae_enable_tiling` is unset when None). `step_fix`: the keys that make the training
    step fit (from the sweep), named when the step does not."""
    room = gpu.memory_gib * GiB
    verdict = PhaseVerdict(gpu, run_phases(plan))
    if plan.validation is not None:
        plan = _decode_choice(plan, gpu, unset, verdict)
        verdict.phases = run_phases(plan)
    for phase in verdict.phases:
        if phase.peak > room:
            verdict.refusal = (
                f"{phase.name} is predicted to need {gib(phase.peak)}, more than the {gpu.memory_gib:g} GiB of "
                f"this {gpu.name}: {_fix(plan, phase, gpu, step_fix)}"
            )
            break
    return verdict


def _decode_choice(plan: Plan, gpu: GPU, unset: set[str], verdict: PhaseVerdict) -> Plan:
    """The decode setting that fits, as far as the config leaves it to hvtune; says once what it chose."""
    room = gpu.memory_gib * GiB
    untiled = _with_allowances(plan.validation_decode(tiling=False))
    if plan.settings.get("vae_tiling_unset"):
        more = untiled - room
        why = (
            f"an untiled decode needs ~{gib(more)} more than this {gpu.memory_gib:g} GiB card has"
            if more > 0
            else "vae_enable_tiling unset; an untiled decode would fit too: set vae_enable_tiling=false for it"
        )
        verdict.notes.append(f"validation decode: tiled ({why})")
    decode = _with_allowances(plan.validation_decode())
    can_offload = "enable_model_cpu_offload" in unset and not plan.decode_offload
    can_offload = can_offload and not plan.settings["enable_group_offload"]
    if decode > room and can_offload and _with_allowances(plan.validation_decode(offload=True)) <= room:
        verdict.updates["enable_model_cpu_offload"] = True
        verdict.notes.append(
            f"validation decode: the transformer moves to the CPU for it (enable_model_cpu_offload=true): "
            f"{gib(decode)} with it on the GPU"
        )
        return dataclasses.replace(plan, decode_offload=True)
    return plan


def _fix(plan: Plan, phase: Phase, gpu: GPU, step_fix: str | None) -> str:
    if phase.name == "training step" or not phase.name.startswith(("validation", "EMA")):
        return f"set {step_fix}" if step_fix else "no memory setting fits; a larger card, fewer frames or a lower rank"
    keys = []
    if not plan.settings["vae_enable_tiling"]:
        keys.append("vae_enable_tiling=true")
    if not plan.decode_offload and not plan.settings["enable_group_offload"]:
        keys.append("enable_model_cpu_offload=true")
    keys.append(f"fewer validation_num_video_frames (now {plan.validation.shape.frames})")
    return "set " + ", or ".join(keys) + "; or validation_disable=true"
