"""`hvtune plan`'s prediction: a simulated step plus what meta execution cannot see, and the sweep over memory settings.

What meta execution cannot see is accounted for separately, with the estimate stated in `Plan.allowances`:
group offload (diffusers' offload hooks copy real weights CPU <-> GPU; the plan computes the resident groups from the
real module tree instead, `offload_resident`), the CUDA context, the caching allocator's fragmentation, kernels'
workspaces, and the 8-bit optimizer's kernel (its state is allocated by bitsandbytes' own `init_state`, exact).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from hvtune.config.settings import TrainConfig
from hvtune.model.architectures import GPU, forward_flops, train_step_flops, transformer_config
from hvtune.plan.shapes import StepShape
from hvtune.plan.simulate import StepMemory, build_meta_transformer, run_step
from hvtune.plan.tracker import tensor_bytes

GiB = 2**30

# Allowances for what a meta execution cannot see (see docs/PERFORMANCE.md, "hvtune plan"):
CUDA_CONTEXT_GIB = 0.6  # CUDA context + cuBLAS/cuDNN handles: outside torch's allocator, nvidia-smi's first ~500 MB
FRAGMENTATION = 0.08  # the caching allocator's reserved-but-unused share at the peak (expandable_segments lowers it)
ASSUMED_MFU = 0.35  # model FLOPs utilisation assumed for s/step (bench_gpu.py measures the real one on a card)
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

    @property
    def activations(self) -> int:
        return self.memory.activations

    @property
    def tracked_peak(self) -> int:
        """What torch.cuda.max_memory_allocated should show: tracked peak with the offloaded weights taken out."""
        return self.memory.peak - self.memory.base_weights + self.device_weights

    @property
    def allowances(self) -> dict[str, int]:
        return {
            "CUDA context (outside the allocator)": int(CUDA_CONTEXT_GIB * GiB),
            f"allocator fragmentation ({FRAGMENTATION:.0%} of the peak)": int(FRAGMENTATION * self.tracked_peak),
            "attention workspace (flash kernel: logsumexp only; measured 0)": 0,
        }

    @property
    def gpu_peak(self) -> int:
        return self.tracked_peak + sum(self.allowances.values())

    @property
    def host_peak(self) -> int:
        """Loading reads the bf16 weights into host memory before moving them; offload keeps the base there."""
        load = self.memory.base_params * 2
        return int(HOST_RUNTIME_GIB * GiB) + max(load, self.host_weights + self.memory.lora_weights)

    def seconds_per_step(self, gpu: GPU, mfu: float = ASSUMED_MFU) -> float:
        compute = self.train_flops / (gpu.bf16_tflops * 1e12 * mfu)
        if not self.settings.get("enable_group_offload"):
            return compute
        passes = 3 if self.settings.get("gradient_checkpointing") else 2  # forward, (recompute,) backward
        copy = self.host_weights * passes / (gpu.host_link_gbps * 1e9)
        return max(compute, copy) if self.settings.get("group_offload_use_stream") else compute + copy


MEMORY_KNOBS = ("gradient_checkpointing", "enable_group_offload", "group_offload_use_stream", "base_model_precision")


def _plan(cfg: TrainConfig, shape: StepShape, transformer, memory: StepMemory, model_config: dict) -> Plan:
    if cfg.enable_group_offload:
        device_weights, host_weights = offload_resident(transformer, cfg)
    else:
        device_weights, host_weights = memory.base_weights, 0
    fwd = forward_flops(
        model_config, shape.video_tokens, shape.qwen_tokens, shape.byt5_tokens, shape.image_tokens, shape.batch
    )
    flops = train_step_flops(fwd, gradient_checkpointing=cfg.gradient_checkpointing)
    settings = {k: getattr(cfg, k) for k in (*MEMORY_KNOBS, "lora_rank", "optimizer", "train_batch_size")}
    return Plan(cfg.model_flavour, shape, settings, memory, device_weights, host_weights, flops)


def simulate(cfg: TrainConfig, shape: StepShape, *, autocast_device: str = "cuda") -> Plan:
    """The full-size step for `cfg` at `shape` on the meta device."""
    model_config = transformer_config(cfg.model_flavour)
    transformer = build_meta_transformer(model_config)
    memory = run_step(transformer, cfg, shape, device="meta", autocast_device=autocast_device)
    return _plan(cfg, shape, transformer, memory, model_config)


def sweep(cfg: TrainConfig, shape: StepShape, gpu: GPU, progress=print) -> list[Plan]:
    """Every memory setting for `cfg` at `shape`: checkpointing x base precision are simulated (they change what
    the step allocates); group offload (off / block_level / block_level + streams where CUDA) changes only where the
    base weights live, so it is derived from each simulation with `offload_resident`."""
    model_config = transformer_config(cfg.model_flavour)
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
            for offload in offloads:
                plans.append(_plan(variant.model_copy(update=offload), shape, transformer, memory, model_config))
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
