"""`hvtune plan --gpus N`: the one-GPU plan spread over N GPUs as DDP, FSDP2 and context parallelism would hold it.

Per GPU, from the simulated one-GPU step (`Plan`), predicted, not measured:
- DDP: every GPU holds what one GPU holds, plus DDP's gradient buckets (the LoRA gradients once more).
- FSDP2 (`fsdp_enable`, `fsdp_version: 2`): the frozen base and the LoRA with its gradients and optimizer state are
  sharded over every GPU (accelerate shards over the data- and context-parallel GPUs together), plus the blocks
  gathered while they run: the modules outside the repeated blocks (gathered by the root for the whole step) and two
  blocks (the one computing and the next, prefetched). With `fsdp_reshard_after_forward: false` the gathered blocks
  stay until the backward: the whole base is on every GPU at the peak.
- context parallelism (`context_parallel_size` k): the sequence is split over k GPUs, so each holds 1/k of the
  activations, plus one attention layer's whole K and V while it runs (the all-gather strategy).

Time per optimizer step: the one-GPU step's compute (divided by k under context parallelism), and the collectives'
bytes over a stated interconnect (`INTERCONNECTS`) at `LINK_EFFICIENCY` of its rate. DDP's all-reduce and FSDP2's
gathers overlap with compute (bucketed all-reduce, prefetch), so the step takes the longer of the two; context
parallelism's K/V gathers sit on the attention's critical path and add. Collective latency (about 160 collectives a
step under FSDP2, tens of microseconds each) is left out.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from hvtune.errors import UserError
from hvtune.model.architectures import GPU, transformer_config
from hvtune.plan.prediction import ASSUMED_MFU, RANKING_TFLOPS, GiB, Plan

LINK_EFFICIENCY = 0.8  # share of a link's rate NCCL's ring collectives reach: assumed, not measured here


@dataclass(frozen=True)
class Interconnect:
    """A link between GPUs: its rate per direction per GPU (GB/s), and where that figure comes from."""

    key: str
    name: str
    gb_per_s: float
    source: str


INTERCONNECTS = {
    i.key: i
    for i in (
        Interconnect("pcie4", "PCIe 4.0 x16", 31.5, "PCI-SIG PCIe 4.0: 16 GT/s x 16 lanes, 128b/130b"),
        Interconnect("pcie5", "PCIe 5.0 x16", 63.0, "PCI-SIG PCIe 5.0: 32 GT/s x 16 lanes, 128b/130b"),
        Interconnect("nvlink3", "NVLink 3 (A100 SXM)", 300.0, "NVIDIA A100 datasheet: 600 GB/s, both directions"),
        Interconnect("nvlink4", "NVLink 4 (H100/H200 SXM)", 450.0, "NVIDIA H100 datasheet: 900 GB/s, both directions"),
        Interconnect("nvlink5", "NVLink 5 (B200)", 900.0, "NVIDIA Blackwell datasheet: 1.8 TB/s, both directions"),
        Interconnect("ib-hdr", "InfiniBand HDR, 200 Gb/s per GPU", 25.0, "IBTA HDR: 200 Gb/s per port"),
        Interconnect(
            "ib-ndr", "InfiniBand NDR, 400 Gb/s per GPU", 50.0,
            "IBTA NDR: 400 Gb/s per port; RunPod instant clusters: 3200 Gb/s per 8-GPU node",
        ),
        Interconnect("eth100", "100 Gb Ethernet per machine", 12.5, "IEEE 802.3 100GbE: 100 Gb/s"),
        Interconnect("eth10", "10 Gb Ethernet per machine", 1.25, "IEEE 802.3 10GbE: 10 Gb/s"),
    )
}  # fmt: skip


def default_interconnect(gpu: GPU | None) -> Interconnect:
    """The link a card usually has to its neighbours in one box: NVLink on SXM boards, else PCIe of its host link."""
    name = gpu.name if gpu else ""
    if name in ("H100", "H200"):
        return INTERCONNECTS["nvlink4"]
    if name == "B200":
        return INTERCONNECTS["nvlink5"]
    return INTERCONNECTS["pcie5" if gpu is not None and gpu.host_link_gbps >= 50 else "pcie4"]


def parse_interconnect(key: str | None, gpu: GPU | None, gpus: int = 1) -> Interconnect:
    """The --interconnect named (or the card's usual one); checked with --gpus before any simulation."""
    if gpus < 1:
        raise UserError(f"--gpus {gpus}: at least 1")
    if key is None:
        return default_interconnect(gpu)
    if key.lower() not in INTERCONNECTS:
        raise UserError(f"unknown --interconnect {key!r}; one of {', '.join(INTERCONNECTS)}")
    return INTERCONNECTS[key.lower()]


@dataclass(frozen=True)
class Layout:
    """How N GPUs share the run: FSDP2 or DDP, and the context-parallel degree (1: off)."""

    gpus: int
    fsdp: bool
    cp: int = 1
    reshard_after_forward: bool = True

    @property
    def data_parallel(self) -> int:
        return self.gpus // self.cp

    def label(self) -> str:
        if self.gpus == 1:
            return "1 GPU"
        name = ("FSDP2" if self.reshard_after_forward else "FSDP2 (no reshard)") if self.fsdp else "DDP"
        return name + (f" + context parallel {self.cp}" if self.cp > 1 else "")

    def config_keys(self) -> dict[str, object]:
        keys: dict[str, object] = {}
        if self.fsdp:
            keys = {"fsdp_enable": True, "fsdp_version": 2, "fsdp_reshard_after_forward": self.reshard_after_forward}
        if self.cp > 1:
            keys["context_parallel_size"] = self.cp
        return keys


@functools.cache
def block_shares(flavour: str) -> tuple[float, float, int]:
    """(the largest repeated block's share of the parameters, the share outside the repeated blocks, K/V width) of
    the flavour's full-size transformer, counted on the meta device."""
    import torch

    from hvtune.plan.simulate import build_meta_transformer

    config = transformer_config(flavour)
    transformer = build_meta_transformer(config)
    total = sum(p.numel() for p in transformer.parameters())
    largest, outside = 0, 0
    for child in transformer.children():
        if isinstance(child, torch.nn.ModuleList):
            largest = max([largest, *(sum(p.numel() for p in block.parameters()) for block in child)])
        else:
            outside += sum(p.numel() for p in child.parameters())
    return largest / total, outside / total, config["num_attention_heads"] * config["attention_head_dim"]


@dataclass(frozen=True)
class ScalePlan:
    """One layout's prediction, per GPU."""

    layout: Layout
    plan: Plan
    base: int  # base weights held: the shard plus the gathered blocks (FSDP2), else the one-GPU figure
    gathered: int  # of which gathered blocks in flight (FSDP2)
    lora_state: int  # LoRA weights, gradients, optimizer state (and DDP's buckets)
    activations: int  # activations and temporaries of this GPU's part of the micro-batch
    kv_in_flight: int  # context parallelism: one attention layer's whole K and V
    compute_s: float
    overlapped_comm_s: float  # DDP's all-reduce, FSDP2's gathers and reduce-scatters: hidden behind compute
    exposed_comm_s: float  # context parallelism's K/V gathers: added

    @property
    def tracked(self) -> int:
        return self.base + self.lora_state + self.activations + self.kv_in_flight

    @property
    def step_peak(self) -> int:
        return self.tracked + sum(Plan.allowances_for(self.tracked).values())

    @property
    def validation_peak(self) -> int:
        """The one-GPU validation round with the base weights this layout holds (validation runs on every GPU
        of a sharded model; its decode is not split)."""
        if self.plan.validation is None:
            return 0
        return self.plan.validation_peak() - self.plan.device_weights + self.base

    @property
    def peak(self) -> int:
        return max(self.step_peak, self.validation_peak)

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.overlapped_comm_s) + self.exposed_comm_s

    @property
    def comm_s(self) -> float:
        return self.overlapped_comm_s + self.exposed_comm_s

    @property
    def samples_per_s(self) -> float:
        return self.layout.data_parallel * self.plan.shape.batch / self.step_s

    def fits(self, gpu: GPU) -> bool:
        return self.peak <= gpu.memory_gib * GiB


def _seconds(nbytes: float, link: Interconnect) -> float:
    return nbytes / (link.gb_per_s * 1e9 * LINK_EFFICIENCY)


def scale_plan(plan: Plan, layout: Layout, gpu: GPU | None, link: Interconnect) -> ScalePlan:
    """`plan` (the simulated one-GPU step) as `layout` holds and runs it on each GPU."""
    m, n, cp = plan.memory, layout.gpus, layout.cp
    largest, outside, width = block_shares(plan.flavour)
    lora = m.lora_weights + m.lora_grads + m.optimizer_state
    activations = (m.activations - m.lora_grads) // cp  # the sequence's share; LoRA gradients counted in `lora`
    flops_s = (gpu.bf16_tflops if gpu and gpu.bf16_tflops else RANKING_TFLOPS) * 1e12 * ASSUMED_MFU
    checkpointing = bool(plan.settings.get("gradient_checkpointing"))
    overlapped = 0.0
    if layout.fsdp:  # FSDP2 replaces group offload: the base is sharded instead of parked in host memory
        gathered = int(m.base_weights * (outside + 2 * largest)) if layout.reshard_after_forward else m.base_weights
        base = min(m.base_weights, m.base_weights // n + gathered)
        gathered = base - m.base_weights // n
        lora_state = lora // n
        compute = plan.train_flops / flops_s / cp
        gathers = 2 if layout.reshard_after_forward else 1  # forward, and again for the backward
        overlapped = _seconds(gathers * (n - 1) / n * m.base_weights + (n - 1) / n * m.lora_grads, link)
    else:
        base, gathered = plan.device_weights, 0
        lora_state = lora + (m.lora_grads if n > 1 else 0)  # DDP's gradient buckets
        compute = (plan.seconds_per_step(gpu) if gpu else plan.train_flops / flops_s) / cp
        overlapped = _seconds(2 * (n - 1) / n * m.lora_grads, link) if n > 1 else 0.0
    kv, exposed = 0, 0.0
    if cp > 1:
        layers = transformer_config(plan.flavour)["num_layers"]
        kv = 2 * plan.shape.batch * plan.shape.seq_len * width * 2  # K and V of one layer, bf16, whole sequence
        passes = 3 if checkpointing else 2  # all-gather forward, reduce-scatter backward, gather again to recompute
        exposed = _seconds(passes * layers * (cp - 1) / cp * kv, link)
    return ScalePlan(layout, plan, base, gathered, lora_state, activations, kv, compute, overlapped, exposed)


def layouts(max_gpus: int) -> list[Layout]:
    """1, 2, 4, ... up to max_gpus GPUs (and max_gpus itself): DDP, FSDP2, and each with context parallel 2, 4, 8
    where the GPUs divide."""
    counts = sorted({n for n in (1, 2, 4, 8, 16, 32, 64) if n <= max_gpus} | {max_gpus})
    found = [Layout(1, fsdp=False)]
    for n in counts[1:]:
        for cp in (1, 2, 4, 8):
            if cp <= n and n % cp == 0:
                found += [Layout(n, fsdp=False, cp=cp), Layout(n, fsdp=True, cp=cp)]
    return found


def scale_sweep(plan: Plan, max_gpus: int, gpu: GPU | None, link: Interconnect) -> list[ScalePlan]:
    """Every layout on up to `max_gpus` GPUs, fastest (samples/s) first."""
    plans = [scale_plan(plan, layout, gpu, link) for layout in layouts(max_gpus)]
    return sorted(plans, key=lambda s: (-s.samples_per_s, s.layout.gpus))


def format_scale(scaled: list[ScalePlan], gpu: GPU | None, link: Interconnect) -> str:
    """The sweep's table: per-GPU peak (and, with a card, whether it fits and how fast), then the best layouts."""
    one = next(s for s in scaled if s.layout.gpus == 1)
    card = (
        f"{gpu.name} ({gpu.memory_gib:g} GiB)"
        if gpu
        else "no card named (memory only; --gpu CARD says fits and s/step)"
    )
    lines = [
        f"several GPUs, per GPU, {card}; predicted, not measured:",
        f"  interconnect: {link.name}, {link.gb_per_s:g} GB/s per direction ({link.source}), {LINK_EFFICIENCY:.0%} "
        "of it assumed reached (--interconnect " + "|".join(INTERCONNECTS) + ")",
    ]
    timed = gpu is not None and gpu.bf16_tflops is not None
    for s in scaled:
        mark = ("fits" if s.fits(gpu) else "no  ") if gpu else ""
        parts = [
            f"  {mark}{' ' if mark else ''}{s.peak / GiB:6.1f} GiB",
            f"{s.layout.gpus:>3} GPU{'s' if s.layout.gpus > 1 else ' '}",
        ]
        parts.append(f"{s.layout.label():<30}")
        if timed:
            speedup = s.samples_per_s / one.samples_per_s
            parts.append(
                f"{s.step_s:6.1f} s/step  {s.samples_per_s:6.3f} samples/s (x{speedup:.1f})  comm {s.comm_s:.2f} s"
            )
        parts.append(_memory_parts(s))
        lines.append("  ".join(parts))
    if gpu is not None:
        lines += _best_lines(scaled, gpu)
    return "\n".join(lines)


def _memory_parts(s: ScalePlan) -> str:
    text = f"[base {s.base / GiB:.1f}"
    if not s.layout.fsdp and s.plan.host_weights:
        text += " (group offload)"
    if s.gathered:
        text += f" of which gathered {s.gathered / GiB:.1f}"
    text += f", LoRA+optimizer {s.lora_state / GiB:.2f}, activations {s.activations / GiB:.1f}"
    if s.kv_in_flight:
        text += f", K/V {s.kv_in_flight / GiB:.2f}"
    validation = " (validation binds)" if s.validation_peak > s.step_peak else ""
    return text + f"]{validation}"


def _best_lines(scaled: list[ScalePlan], gpu: GPU) -> list[str]:
    fits = [s for s in scaled if s.fits(gpu)]
    if not fits:
        least = min(scaled, key=lambda s: s.peak)
        return [
            f"nothing fits {gpu.memory_gib:g} GiB up to {max(s.layout.gpus for s in scaled)} GPUs: the least per GPU "
            f"is {least.layout.label()} on {least.layout.gpus} GPUs, {least.peak / GiB:.1f} GiB; add GPUs, or the "
            "memory settings above (hvtune plan --gpu lists them)"
        ]
    fewest = min(fits, key=lambda s: (s.layout.gpus, -s.samples_per_s))
    lines = [f"fewest GPUs that fit: {_how(fewest)}"]
    if fits[0] is not fewest:
        lines.append(f"fastest that fits: {_how(fits[0])}")
    return lines


def _how(s: ScalePlan) -> str:
    keys = ", ".join(
        f'"{k}": {str(v).lower() if isinstance(v, bool) else v}' for k, v in s.layout.config_keys().items()
    )
    launch = f"NUM_PROCESSES={s.layout.gpus}" if s.layout.gpus > 1 else "one GPU"
    return f"{s.layout.label()} on {s.layout.gpus} GPU(s), {s.peak / GiB:.1f} GiB each ({launch}" + (
        f"; config.json: {keys})" if keys else ")"
    )
