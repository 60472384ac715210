"""How one run spans several processes: DDP (the default) or FSDP2 (`fsdp_enable`), through accelerate.

With FSDP2 the frozen base is sharded: accelerate's `fully_shard` wraps every transformer block (and the patch embed
and token refiner, the model's `_no_split_modules`), so each process holds 1/N of the base's weights plus the blocks
it is running. The LoRA stays out of the shards (`ignored_modules`): it is small (rank 64 on the 8.3B transformer is
about 0.3 GB in float32), so every process keeps a full copy and its optimizer state, and its gradient is averaged
over the processes once per optimizer step (`sync_replicated_gradients`), as DDP would. That keeps everything that
reads or writes the LoRA (checkpoints, EMA, exports, validation's weight swap) the same code as with one process:
a checkpoint holds the whole LoRA and its optimizer state, and resumes on any process count.

accelerate 1.15 switches to FSDP only for GPU-like devices: on the CPU (gloo) it silently stays with DDP-style
MULTI_CPU. `build_accelerator` sets its state to FSDP there, so the tests run the same `fully_shard` path on DTensors
that a GPU run takes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hvtune.errors import UserError
from hvtune.run_files import RunFiles

# the LoRA's modules (peft: `<layer>.lora_A` / `.lora_B` ModuleDicts): replicated, never sharded
LORA_MODULES = r".*\.lora_(A|B)"


# what torch's collectives say when the process at the other end is gone (gloo's TCP pair, NCCL's abort)
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")


class LostProcess(UserError):
    """Another training process died (killed, out of host memory) while this one waited for it in a collective."""

    exit_code = 1  # the input was fine


@dataclass(frozen=True)
class Parallelism:
    """What a run shows and records about its processes: progress, status.json, run.json, the run page, compare."""

    world_size: int
    sharding: str  # "none" (one process), "ddp" (the base replicated) or "fsdp2" (the base sharded)
    context_parallel_size: int

    def describe(self) -> str:
        """'2 processes, fsdp2' ('1 process'; the context-parallel degree when it is not 1)."""
        text = f"{self.world_size} process{'es' if self.world_size != 1 else ''}"
        text += f", {self.sharding}" if self.sharding != "none" else ""
        return text + (f", context parallel {self.context_parallel_size}" if self.context_parallel_size != 1 else "")

    def record(self) -> dict[str, Any]:
        return asdict(self)


def parallelism(cfg, accelerator) -> Parallelism:
    """`accelerator` as the loop sees it: under context parallelism it counts data-parallel ranks only."""
    cp = int(cfg.context_parallel_size)
    world = accelerator.num_processes * cp
    return Parallelism(world, sharding_of(accelerator, world), cp)


def sharding_of(accelerator, world: int | None = None) -> str:
    from accelerate.utils import DistributedType

    if (world or accelerator.num_processes) == 1:
        return "none"
    return "fsdp2" if accelerator.distributed_type == DistributedType.FSDP else "ddp"


def fsdp_plugin(cfg, transformer_blocks: list[str] | None = None):
    """accelerate's FSDP2 plugin for SimpleTuner's fsdp_* keys (None when fsdp_enable is false). The wrapped classes
    are the transformer's `_no_split_modules` (hvtune decides them: fsdp_transformer_layer_cls_to_wrap is ignored)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    if not cfg.fsdp_enable:
        return None
    from diffusers import HunyuanVideo15Transformer3DModel

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=transformer_blocks or list(HunyuanVideo15Transformer3DModel._no_split_modules),
        reshard_after_forward=cfg.fsdp_reshard_after_forward,
        ignored_modules=LORA_MODULES,
    )


def build_accelerator(cfg, out: Path, names: list[str]):
    """The run's Accelerator: trackers, mixed precision, accumulation; FSDP2 with fsdp_enable on several processes
    (one process has nothing to shard: it trains as without the key)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration

    plugin = fsdp_plugin(cfg)
    accelerator = Accelerator(
        log_with=names or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(RunFiles(out).logs / "tensorboard")),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        fsdp_plugin=plugin,
    )
    if plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # why: accelerate 1.15 keeps MULTI_CPU (DDP) on the CPU even with an FSDP plugin; FSDP2 runs there on gloo.
        # PartialState's copy too: every AcceleratorState() (prepare makes some) copies it over its own
        from accelerate.state import PartialState

        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    return accelerator


def sync_replicated_gradients(accelerator, params: list) -> None:
    """FSDP2: average the replicated LoRA's gradients over the processes (the sharded base has none), in one
    flattened all-reduce; DDP (which averaged them in backward) and one process: nothing."""
    import torch
    import torch.distributed as dist

    if sharding_of(accelerator) != "fsdp2":
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def clipping_accelerator(accelerator):
    """What `optim.clip_gradients` clips through: accelerate, or with FSDP2 torch itself (None): the LoRA's gradients
    are plain tensors, replicated and already averaged, so clipping them on each process is the one-process clipping;
    accelerate refuses clip_grad_value_ (SimpleTuner's default method) under FSDP. fp16's scaled gradients are
    unscaled first, as accelerate's clipping would."""
    if sharding_of(accelerator) != "fsdp2":
        return accelerator
    if accelerator.scaler is not None:
        accelerator.unscale_gradients()
    return None


def raise_if_lost_process(error: RuntimeError, accelerator, kept: tuple[int, Path] | None) -> None:
    """`LostProcess` (one line) when `error` says another process is gone; `kept`: (step, checkpoint) this run
    wrote last (the main process's)."""
    text = str(error)
    if accelerator.num_processes == 1 or not any(sign in text for sign in PEER_LOST):
        return
    where = f"the checkpoint of step {kept[0]}" if kept else "its newest checkpoint"
    raise LostProcess(
        f"process {accelerator.process_index} of {accelerator.num_processes}: another training process stopped "
        f"mid-step (killed, or out of memory: its own log says which). Start the run again: it resumes from {where} "
        f"(resume_from_checkpoint=latest). [{text.splitlines()[0][:200]}]"
    ) from error
