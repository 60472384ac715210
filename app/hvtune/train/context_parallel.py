"""Context parallelism (`context_parallel_size`): the video sequence of one sample split over several processes,
with data parallel over the rest (world = dp x cp), on diffusers' context-parallel (Ulysses) attention.

SimpleTuner 4.10.1's meaning (helpers/training/context_parallel.py): `context_parallel_comm_strategy` "allgather" is
ring attention (`ContextParallelConfig(ring_degree=cp, ring_anything=True)`), "alltoall" is Ulysses
(`ulysses_degree=cp`); without FSDP the remaining processes replicate the model (DDP over all of them) and the loss
is scaled by cp for the backward, since DDP averages the CP ranks' partial gradients over the whole world.

hvtune trains with Ulysses only; `check` refuses "allgather" (`config.rules.context_parallel_problems`): in diffusers
0.42.1 the any-length ring has no backward, and the even ring needs the text padded to a multiple of cp but applies
each rank's key mask to every other rank's keys. Ulysses gives the same attention (each rank, 1/cp of the heads over
the whole sequence) and all-gathers the key mask.

diffusers 0.42.1's `HunyuanVideo15Transformer3DModel` has no `_cp_plan`; `hunyuan_video15_cp_plan` is ours, in the
form of Wan's and Flux's: RoPE's outputs and the first block's video and text streams are split along the sequence,
`proj_out`'s output is gathered. The text stream is split too (not replicated), else every rank would add the same
text keys to the joint attention. The token mask is not split by the plan: `KeyPaddingAttnProcessor` takes its
rank's part itself, so that the "is anything padded" answer is the same on every rank (a rank that passed no mask
while another passed one would wait forever in Ulysses' mask all-gather).

The hooks split only while gradients are tracked: validation runs on the main process alone, unsplit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hvtune.errors import UserError


@dataclass(frozen=True)
class Topology:
    """Where this process sits: rank r is context-parallel rank r % cp of data-parallel group r // cp."""

    cp_size: int
    world_size: int
    rank: int
    strategy: str  # "alltoall" (Ulysses); "allgather" (ring) is refused before training

    @property
    def dp_size(self) -> int:
        return self.world_size // self.cp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp_size


class DataParallelView:
    """The accelerator as the loop's data side sees it: `process_index` / `num_processes` are the data-parallel rank
    and size, so both ranks of a context-parallel group read the same samples (and draw the same LoRA dropout), and
    the global batch is train_batch_size x dp. Everything else is the accelerator's own."""

    def __init__(self, accelerator, topology: Topology) -> None:
        self._accelerator = accelerator
        self.topology = topology

    @property
    def process_index(self) -> int:
        return self.topology.dp_rank

    @property
    def num_processes(self) -> int:
        return self.topology.dp_size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._accelerator, name)


def data_parallel_view(accelerator, cfg):
    """The accelerator itself with `context_parallel_size` 1, else its `DataParallelView`."""
    if cfg.context_parallel_size == 1:
        return accelerator
    world, cp = accelerator.num_processes, cfg.context_parallel_size
    if world % cp:
        raise UserError(
            f"context_parallel_size {cp} does not divide the {world} processes: launch a multiple of {cp} "
            "processes or change context_parallel_size"
        )
    if cfg.context_parallel_comm_strategy != "alltoall":
        raise UserError(
            f"context_parallel_comm_strategy {cfg.context_parallel_comm_strategy}: hvtune trains with alltoall "
            "(Ulysses) only; diffusers' ring attention cannot train this model (docs/PERFORMANCE.md)"
        )
    return DataParallelView(accelerator, Topology(cp, world, accelerator.process_index, "alltoall"))


def hunyuan_video15_cp_plan() -> dict:
    """The `_cp_plan` diffusers 0.42.1 lacks for HunyuanVideo 1.5 (module name -> what to split or gather)."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    rope = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)  # (S_video, D/2) cos and sin
    stream = ContextParallelInput(split_dim=1, expected_dims=3)  # (B, S, D)
    return {
        "rope": {0: rope, 1: rope},
        "transformer_blocks.0": {"hidden_states": stream, "encoder_hidden_states": stream},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


def enable_context_parallel(model, params: list, accelerator, manifest=None) -> None:
    """Split `model`'s sequence over the context-parallel group of `accelerator` (a `DataParallelView`); nothing
    without one. Call after the LoRA is added and before the first step; `manifest`'s buckets are checked first."""
    if not isinstance(accelerator, DataParallelView):
        return
    import torch

    topology = accelerator.topology
    if manifest is not None and (problem := bucket_split_problem(topology.cp_size, manifest)):
        raise UserError(problem)
    _check_model(model, topology)
    config = _parallel_config(topology, accelerator.device)
    for block in model.transformer_blocks:
        processor = block.attn.processor
        processor._parallel_config = config
    _register_hooks(model, config.context_parallel_config, topology)
    model._parallel_config = config
    # DDP averages over all dp x cp processes; each CP rank holds a partial gradient (its tokens' share): x cp
    # before the all-reduce gives their sum, averaged over the data-parallel groups (SimpleTuner scales the loss).
    for p in params:
        p.register_hook(lambda grad, cp=topology.cp_size: grad * cp)
    torch.distributed.barrier()
    accelerator.print(
        f"context parallel: each sample split over {topology.cp_size} processes (Ulysses attention), "
        f"{topology.dp_size} data-parallel group(s)"
    )


def bucket_split_problem(cp_size: int, manifest) -> str | None:
    """One line for the first bucket of `manifest` whose video tokens `cp_size` Ulysses ranks cannot share evenly,
    else None (`hvtune check`'s pre-flight can ask it too)."""
    from hvtune.model.architectures import latent_shape

    for width, height, frames in sorted({tuple(s.bucket) for s in manifest.samples}):
        _, *latent = latent_shape(frames, height, width)
        if problem := _video_split_problem(latent, cp_size, f"{width}x{height}, {frames} frames"):
            return problem
    return None


def _parallel_config(topology: Topology, device):
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    # diffusers wants both a "ring" and a "ulysses" dimension (ring of size 1); rank r is dp r // cp, cp r % cp
    shape = (topology.dp_size, 1, topology.cp_size)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=("dp", "ring", "ulysses"))
    cp = ContextParallelConfig(ulysses_degree=topology.cp_size, mesh=mesh)
    config = ParallelConfig(context_parallel_config=cp)
    config.setup(topology.rank, topology.world_size, device, mesh=mesh)
    return config


def _check_model(model, topology: Topology) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    heads = model.config.num_attention_heads
    if heads % topology.cp_size:
        raise UserError(
            f"context_parallel_size {topology.cp_size} does not divide the transformer's {heads} attention heads "
            "(Ulysses, context_parallel_comm_strategy=alltoall, splits the heads): use a divisor of it"
        )
    backend = model.transformer_blocks[0].attn.processor.backends[0]
    if backend not in (None, "native") and not _AttentionBackendRegistry._is_context_parallel_available(
        AttentionBackendName(backend)
    ):
        raise UserError(
            f"attention_mechanism: the kernel {backend} has no context-parallel version in diffusers; use one of "
            f"{', '.join(sorted(_AttentionBackendRegistry._supports_context_parallel))} or context_parallel_size 1"
        )


def _register_hooks(model, cp_config, topology: Topology) -> None:
    from diffusers.hooks.context_parallel import ContextParallelGatherHook, ContextParallelSplitHook
    from diffusers.hooks.hooks import HookRegistry, ModelHook
    from diffusers.models._modeling_parallel import ContextParallelOutput

    class TrainingSplit(ContextParallelSplitHook):
        def pre_forward(self, module, *args, **kwargs):
            return super().pre_forward(module, *args, **kwargs) if _training() else (args, kwargs)

        def post_forward(self, module, output):
            return super().post_forward(module, output) if _training() else output

    class TrainingGather(ContextParallelGatherHook):
        def post_forward(self, module, output):
            return super().post_forward(module, output) if _training() else output

    class EvenSequence(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            if _training():
                latent = kwargs["hidden_states"].shape[2:]
                bucket = f"{latent[2] * 16}x{latent[1] * 16}, {latent[0]} latent frames"
                if problem := _video_split_problem(latent, topology.cp_size, bucket):
                    raise UserError(problem)
                _pad_text_to_split(kwargs, topology.cp_size)
            return args, kwargs

    HookRegistry.check_if_exists_or_initialize(model).register_hook(EvenSequence(), "hvtune_cp_even_sequence")
    for name, plan in hunyuan_video15_cp_plan().items():
        gather = isinstance(plan, ContextParallelOutput)
        hook = TrainingGather([plan], cp_config) if gather else TrainingSplit(plan, cp_config)
        HookRegistry.check_if_exists_or_initialize(model.get_submodule(name)).register_hook(hook, f"hvtune_cp_{name}")


def _training() -> bool:
    import torch

    return torch.is_grad_enabled()


def _video_split_problem(latent, cp_size: int, bucket: str) -> str | None:
    """Ulysses splits the video tokens (latent frames x height x width) into equal parts."""
    tokens = latent[0] * latent[1] * latent[2]
    if tokens % cp_size == 0:
        return None
    return (
        f"context_parallel_size {cp_size} does not divide the {tokens} video tokens of bucket {bucket} (they are "
        "split evenly): use another context_parallel_size, or a resolution whose token count it divides"
    )


def _pad_text_to_split(kwargs: dict, cp_size: int) -> None:
    """Pad the Qwen text with masked tokens so that the joint text (image + ByT5 + Qwen) splits evenly: padded keys
    are hidden by the key mask and padded queries are never read, so the prediction is unchanged."""
    import torch.nn.functional as F

    image = kwargs.get("image_embeds")
    total = kwargs["encoder_hidden_states"].shape[1] + (image.shape[1] if image is not None else 0)
    text_2 = kwargs.get("encoder_hidden_states_2")
    total += text_2.shape[1] if text_2 is not None else 0
    extra = -total % cp_size
    if extra:
        kwargs["encoder_hidden_states"] = F.pad(kwargs["encoder_hidden_states"], (0, 0, 0, extra))
        kwargs["encoder_attention_mask"] = F.pad(kwargs["encoder_attention_mask"], (0, extra))
