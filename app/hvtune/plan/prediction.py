"""`hvtune plan`'s prediction: a simulated step and validation round plus what meta execution cannot see, and the
sweep over memory settings. What a run needs on the GPU is the larger of the training step's peak and the validation
round's (`Plan.run_peak`): validation runs between steps, after the step's activations are freed.

What meta execution cannot see is accounted for separately, with the estimate stated in `Plan.allowances`:
group offload (diffusers' offload hooks copy real weights CPU <-> GPU; the plan computes the resident groups from the
real module tree instead, `offload_resident`), the CUDA context, the caching allocator's fragmentation, kernels'
workspaces, and the 8-bit optimizer's kernel (its state is allocated by bitsandbytes' own `init_state`, exact).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from hvtune.config.settings import TrainConfig
from hvtune.model.architectures import GPU, forward_flops, train_step_flops, transformer_config
from hvtune.plan.shapes import StepShape
from hvtune.plan.simulate import StepMemory, build_meta_transformer, run_step
from hvtune.plan.tracker import tensor_bytes
from hvtune.plan.validation import ValidationMemory, simulate_validation

GiB = 2**30

# Allowances for what a meta execution cannot see (see docs/PERFORMANCE.md, "hvtune plan"):
CUDA_CONTEXT_GIB = 0.6  # CUDA context + cuBLAS/cuDNN handles: outside torch's allocator, nvidia-smi's first ~500 MB
FRAGMENTATION = 0.08  # the caching allocator's reserved-but-unused share at the peak (expandable_segments lowers it)
ASSUMED_MFU = 0.35  # model FLOPs utilisation assumed for s/step (bench_gpu.py measures the real one on a card)
RANKING_TFLOPS = 989.0  # orders the settings of a card of unknown speed (H100 dense bf16); never printed
HOST_RUNTIME_GIB = 4.0  # Python, torch, CUDA libraries, the loader's buffers


def offload_resident(transformer, cfg: TrainConfig) -> tuple[int, int]:
    """(bytes of base weights resident on the GPU, bytes of base weights in host memory) under diffusers' group
    offload as `prepare_base` sets it up: block_level groups of `group_offload_blocks_per_group` blocks of each
    ModuleList, every other top-level module onloaded as one group; leaf_level one leaf module at a time. One group
    computes; with `group_offload_use_stream` the next one is prefetched (2 groups). Weights only: LoRA stays put."""
    import torch

    def frozen_bytes(module) -> int:
        return sum(tensor_bytes(p) for p in module.parameters() if not p.requires_grad) + sum(
            tensor_bytes(b) for b in module.buffers()
        )

    total = frozen_bytes(transformer)
    in_flight = 2 if cfg.group_offload_use_stream else 1
    if cfg.group_offload_type == "leaf_level":
        leaves = [frozen_bytes(m) for m in transformer.modules() if not list(m.children())]
        return in_flight * max(leaves), total
    groups, rest = [], 0
    for _name, child in transformer.named_children():
        if isinstance(child, torch.nn.ModuleList):
            n = cfg.group_offload_blocks_per_group
            blocks = list(child)
            groups += [sum(frozen_bytes(b) for b in blocks[i : i + n]) for i in range(0, len(blocks), n)]
        else:
            rest += frozen_bytes(child)
    return rest + in_flight * max(groups), total


@dataclass
class Plan:
    flavour: str
    shape: StepShape
    settings: dict[str, Any]
    memory: StepMemory
    device_weights: int  # base weights resident on the GPU (all of them unless offloaded)
    host_weights: int  # base weights held in host memory by group offload
    train_flops: float
    validation: ValidationMemory | None = None  # None: validation is off
    decode_offload: bool = False  # enable_model_cpu_offload: the transformer leaves the GPU for the VAE decode

    @property
    def activations(self) -> int:
        return self.memory.activations

    @property
    def tracked_peak(self) -> int:
        """What torch.cuda.max_memory_allocated should show: tracked peak with the offloaded weights taken out."""
        return self.memory.peak - self.memory.base_weights + self.device_weights

    @staticmethod
    def allowances_for(tracked: int) -> dict[str, int]:
        return {
            "CUDA context (outside the allocator)": int(CUDA_CONTEXT_GIB * GiB),
            f"allocator fragmentation ({FRAGMENTATION:.0%} of the peak)": int(FRAGMENTATION * tracked),
            "attention workspace (flash kernel: logsumexp only; measured 0)": 0,
        }

    @property
    def allowances(self) -> dict[str, int]:
        found = self.allowances_for(self.tracked_peak)
        if self.settings.get("dynamo_backend", "no").lower() != "no":
            found["compile workspace (assumed)"] = int(COMPILE_WORKSPACE_GIB * GiB)
        return found

    @property
    def gpu_peak(self) -> int:
        """The training step's peak, allowances included."""
        return self.tracked_peak + sum(self.allowances.values())

    # -- validation: the round's tracked bytes recomposed for this plan's resident base weights
    @property
    def validation_resident(self) -> int:
        """On the GPU when a validation round starts: the base weights resident (all, or offload's groups), the LoRA
        weights (no gradients: the step set them to None), the optimizer's state and the VAE's weights."""
        m = self.memory
        return self.device_weights + m.lora_weights + m.optimizer_state + self.validation.vae_weights

    @property
    def validation_forward(self) -> int:
        return self.validation_resident + self.validation.forward_extra

    def validation_decode(self, tiling: bool | None = None, offload: bool | None = None) -> int:
        """The decode's peak, tiling as configured or as given; with enable_model_cpu_offload (or `offload`) without
        the transformer's weights, which `sample_video` moves to the CPU first."""
        away = self.device_weights + self.memory.lora_weights
        offload = self.decode_offload if offload is None else offload
        return self.validation_resident - (away if offload else 0) + self.validation.decode_extra(tiling)

    def validation_peak(self, tiling: bool | None = None, offload: bool | None = None) -> int:
        """The validation round's peak, allowances included (0 with validation off)."""
        if self.validation is None:
            return 0
        tracked = max(self.validation_forward, self.validation_decode(tiling, offload))
        return tracked + sum(self.allowances_for(tracked).values())

    @property
    def run_peak(self) -> int:
        """What the run needs on the GPU: the larger of the training step's peak and the validation round's."""
        return max(self.gpu_peak, self.validation_peak())

    @property
    def validation_binds(self) -> bool:
        return self.validation_peak() > self.gpu_peak

    def tiled(self) -> Plan:
        """The same plan with vae_enable_tiling on."""
        validation = dataclasses.replace(self.validation, tiling=True) if self.validation else None
        return dataclasses.replace(self, settings={**self.settings, "vae_enable_tiling": True}, validation=validation)

    @property
    def host_peak(self) -> int:
        """Loading reads the bf16 weights into host memory before moving them; offload keeps the base there.
        Validation loads the VAE through host memory, and enable_model_cpu_offload parks the transformer
        (base + LoRA) there while the VAE decodes."""
        m = self.memory
        need = max(m.base_params * 2, self.host_weights + m.lora_weights)
        if self.validation is not None:
            need = max(need, self.host_weights + self.validation.vae_weights)
            need = max(need, m.base_weights + m.lora_weights if self.decode_offload else 0)
        return int(HOST_RUNTIME_GIB * GiB) + need

    def seconds_per_step(self, gpu: GPU, mfu: float = ASSUMED_MFU) -> float:
        """Predicted s/step on `gpu`; a card of unknown speed (a size alone) is ranked at an H100's peak, for the
        order of the sweep only: plan prints no s/step for it."""
        compute = self.train_flops / ((gpu.bf16_tflops or RANKING_TFLOPS) * 1e12 * mfu) / speed_factor(self.settings)
        if not self.settings.get("enable_group_offload"):
            return compute
        passes = 3 if self.settings.get("gradient_checkpointing") else 2  # forward, (recompute,) backward
        copy = self.host_weights * passes / (gpu.host_link_gbps * 1e9)
        return max(compute, copy) if self.settings.get("group_offload_use_stream") else compute + copy


MEMORY_KNOBS = ("gradient_checkpointing", "enable_group_offload", "group_offload_use_stream", "base_model_precision")
OTHER_SETTINGS = ("lora_rank", "optimizer", "train_batch_size", "vae_enable_tiling", "enable_model_cpu_offload")
SPEED_SETTINGS = ("attention_mechanism", "dynamo_backend", "dynamo_use_regional_compilation")
# The s/step factor plan assumes for each fast-path setting and where it comes from (docs/PERFORMANCE.md): 1.0 until
# a session measures it (benchmarks/gpu/session.sh fastpath). No figure for a HunyuanVideo 1.5 LoRA step (frozen base,
# checkpointing) was found published, and the tiny model on a CPU says nothing about a GPU.
SPEEDUPS: dict[str, tuple[float, str]] = {
    "compile": (1.0, "none measured"),
    "attention kernel": (1.0, "none measured"),
    "fp8-torchao": (
        1.0,
        "none measured for a LoRA step; torchao reports up to 1.5x for float8 pretraining on 512 H100s "
        "(docs.pytorch.org/ao, pre-training), where fp8 also serves the weight gradients a frozen base does not need",
    ),
    "fp8wo-torchao": (1.0, "none measured; its matmuls are bf16 after a per-call dequantize"),
}
COMPILE_WORKSPACE_GIB = 0.5  # assumed, not measured: inductor's autotuning buffers and its graphs' own layouts
# Cards with fp8 matmuls (config.kernels: NVIDIA compute capability 8.9+, AMD MI300): the sweep offers fp8-torchao
FP8_CARDS = ("RTX 4090", "RTX 5090", "L40S", "H100 PCIe", "H100 NVL", "H100", "H200", "B200", "MI300X")


def _chosen_speedups(settings: dict[str, Any]) -> list[tuple[str, float, str]]:
    chosen = []
    if settings.get("dynamo_backend", "no").lower() != "no":
        chosen.append((f"compile ({settings['dynamo_backend']})", *SPEEDUPS["compile"]))
    if settings.get("attention_mechanism") not in (None, "diffusers", "kohaku-fa-auto"):
        chosen.append((settings["attention_mechanism"], *SPEEDUPS["attention kernel"]))
    if settings.get("base_model_precision") in SPEEDUPS:
        chosen.append((settings["base_model_precision"], *SPEEDUPS[settings["base_model_precision"]]))
    return chosen


def speed_factor(settings: dict[str, Any]) -> float:
    factor = 1.0
    for _, speedup, _ in _chosen_speedups(settings):
        factor *= speedup
    return factor


def speed_assumption(settings: dict[str, Any]) -> str | None:
    """The line `hvtune plan` prints under s/step when compile, a chosen kernel or an fp8 base is on, or None."""
    chosen = _chosen_speedups(settings)
    if not chosen:
        return None
    said = ", ".join(f"{name} x{speedup:g} ({source})" for name, speedup, source in chosen)
    return f"assumed speed-up: {said}; the s/step is the bf16 eager SDPA step's times these"


def fp8_weight_bytes(transformer) -> tuple[int, int]:
    """(bytes the fp8-converted layers' weights take in bf16, what fp8wo-torchao stores for them: 1 byte a weight and
    one float32 scale per output row) on the simulated (bf16) transformer: `train.base_model.fp8_linear`'s layers."""
    from hvtune.train.base_model import fp8_linear

    layers = [m for name, m in transformer.named_modules() if fp8_linear(m, name)]
    return sum(m.weight.numel() * 2 for m in layers), sum(m.weight.numel() + m.out_features * 4 for m in layers)


def _plan(
    cfg: TrainConfig,
    shape: StepShape,
    transformer,
    memory: StepMemory,
    model_config: dict,
    validation: ValidationMemory | None = None,
) -> Plan:
    if cfg.enable_group_offload:
        device_weights, host_weights = offload_resident(transformer, cfg)
    else:
        device_weights, host_weights = memory.base_weights, 0
    if cfg.base_model_precision == "fp8wo-torchao":  # simulated in bf16 (`_simulated`): the fp8 bytes instead
        bf16, fp8 = fp8_weight_bytes(transformer)
        ratio = (memory.base_weights - bf16 + fp8) / memory.base_weights
        device_weights, host_weights = int(device_weights * ratio), int(host_weights * ratio)
    fwd = forward_flops(
        model_config, shape.video_tokens, shape.qwen_tokens, shape.byt5_tokens, shape.image_tokens, shape.batch
    )
    flops = train_step_flops(fwd, gradient_checkpointing=cfg.gradient_checkpointing)
    settings = {k: getattr(cfg, k) for k in (*MEMORY_KNOBS, *OTHER_SETTINGS, *SPEED_SETTINGS)}
    from hvtune.output.vae_decode import decode_tiling  # the trainer's own rules
    from hvtune.output.validation import transformer_leaves_for_decode

    settings["vae_enable_tiling"] = decode_tiling(cfg)
    settings["vae_tiling_unset"] = cfg.vae_enable_tiling is None
    settings["use_ema"], settings["ema_validation"] = cfg.use_ema, cfg.use_ema and cfg.ema_validation != "none"
    decode_offload = transformer_leaves_for_decode(cfg)
    return Plan(
        cfg.model_flavour, shape, settings, memory, device_weights, host_weights, flops, validation, decode_offload
    )


def simulate(cfg: TrainConfig, shape: StepShape, *, autocast_device: str = "cuda") -> Plan:
    """The full-size step for `cfg` at `shape` on the meta device, and its validation round when validation is on."""
    model_config = transformer_config(cfg.model_flavour)
    transformer = build_meta_transformer(model_config)
    memory = run_step(transformer, _simulated(cfg), shape, device="meta", autocast_device=autocast_device)
    return _plan(cfg, shape, transformer, memory, model_config, simulate_validation(cfg, shape))


def _simulated(cfg: TrainConfig) -> TrainConfig:
    """The config the meta step runs: an fp8 base as bf16. fp8-torchao keeps bf16 weights and saves what a bf16
    linear saves (its fp8 copies live one layer at a time); fp8wo-torchao's smaller weights are counted in `_plan`."""
    if cfg.base_model_precision in SPEEDUPS:
        return cfg.model_copy(update={"base_model_precision": "bf16"})
    return cfg


def speed_options(gpu: GPU) -> str:
    """The fast-path settings `gpu` can run, each with the factor plan assumes for it (they change no memory row but
    fp8's and compile's workspace, so the sweep lists them once, under its table)."""
    kernels = {"MI300X": "aiter"}.get(gpu.name, "flash-attn, sageattention (inference)")
    if gpu.name.startswith(("H100", "H200")):
        kernels += ", flash-attn-3"
    options = [f'dynamo_backend "inductor" x{SPEEDUPS["compile"][0]:g}']
    options.append(f"attention_mechanism {kernels} x{SPEEDUPS['attention kernel'][0]:g}")
    if gpu.name in FP8_CARDS:
        options.append(f'base_model_precision "fp8-torchao" x{SPEEDUPS["fp8-torchao"][0]:g}')
    return f"speed settings {gpu.name} can use: {'; '.join(options)} (assumed factors: none measured yet)"


def _fp8_precisions(gpu: GPU) -> list[str]:
    """The fp8 bases the sweep derives from its bf16 simulation: weight-only fp8 on any card, fp8 matmuls where the
    card has them."""
    return ["fp8wo-torchao", *(["fp8-torchao"] if gpu.name in FP8_CARDS else [])]


def sweep(cfg: TrainConfig, shape: StepShape, gpu: GPU, progress=print, known: Plan | None = None) -> list[Plan]:
    """Every memory setting for `cfg` at `shape`: checkpointing x base precision are simulated (they change what
    the step allocates); group offload (off / block_level / block_level + streams where CUDA) changes only where the
    base weights live, so it is derived from each simulation with `offload_resident`. The validation round is
    simulated once: it runs without gradients (checkpointing changes nothing), and what it keeps resident (base
    weights, LoRA, optimizer state) is each plan's own; `known`, the configured setting's plan when it has been
    simulated already, lends its round."""
    model_config = transformer_config(cfg.model_flavour)
    started = time.perf_counter()
    validation = known.validation if known is not None else simulate_validation(cfg, shape)
    if validation is not None and known is None:
        progress(f"  simulated validation {validation.shape.label()} ({time.perf_counter() - started:.0f} s)")
    offloads = [dict(enable_group_offload=False, group_offload_use_stream=False)]
    offloads.append(dict(enable_group_offload=True, group_offload_use_stream=False, group_offload_type="block_level"))
    if gpu.name != "MI300X":  # streams need CUDA (ROCm refuses group_offload_use_stream)
        offloads.append(
            dict(enable_group_offload=True, group_offload_use_stream=True, group_offload_type="block_level")
        )
    plans = []
    for checkpointing in (False, True):
        for precision in ("bf16", "int8-torchao"):
            variant = cfg.model_copy(
                update={"gradient_checkpointing": checkpointing, "base_model_precision": precision}
            )
            started = time.perf_counter()
            transformer = build_meta_transformer(model_config)
            memory = run_step(transformer, variant, shape, device="meta")
            derived = [precision] + (_fp8_precisions(gpu) if precision == "bf16" else [])  # fp8: the bf16 step's
            for offload, as_precision in ((o, p) for p in derived for o in offloads):
                update = {**offload, "base_model_precision": as_precision}
                plans.append(
                    _plan(variant.model_copy(update=update), shape, transformer, memory, model_config, validation)
                )
            progress(
                f"  simulated checkpointing={'on' if checkpointing else 'off'} base={precision} "
                f"({time.perf_counter() - started:.0f} s)"
            )
    return sorted(plans, key=lambda p: p.seconds_per_step(gpu))


def configured(plans: list[Plan], cfg: TrainConfig) -> Plan | None:
    """The sweep's plan for the configured memory setting, when the sweep covers it (block_level, 1 block/group)."""
    if cfg.enable_group_offload and (cfg.group_offload_type, cfg.group_offload_blocks_per_group) != ("block_level", 1):
        return None
    return next((p for p in plans if all(p.settings[k] == getattr(cfg, k) for k in MEMORY_KNOBS)), None)
