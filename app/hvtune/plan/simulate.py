"""The full-size training step run on tensors that hold no memory, to predict what a GPU needs.

The transformer is built from the flavour's real architecture (`architectures.transformer_config`) on PyTorch's
meta device (8.3B parameters, no bytes), then goes through the trainer's own code:
`train.base_model.prepare_base` (attention processor, base precision incl. torchao int8, gradient checkpointing),
`train.lora.add_lora`, `train.optim.build_optimizer` and `train.step.training_step` (the objective, backward,
clipping, optimizer step), after the optimizer's state has been allocated by its own first step, so the measured step
is a steady-state one. `plan.tracker.TensorTracker` counts the
bytes and supplies the values meta tensors lack; `plan.autocast.MetaAutocast` gives them the GPU's dtypes and
attention kernels. `compare_with_cpu` runs the same step for real on the CPU, which is how the prediction is
validated.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from hvtune.config.settings import TrainConfig
from hvtune.model.architectures import IMAGE_TOKENS
from hvtune.plan.autocast import MetaAutocast, recompute_under
from hvtune.plan.shapes import StepShape
from hvtune.plan.tracker import TensorTracker, storage_bytes, tensor_bytes


@dataclass
class StepMemory:
    """Bytes on the training device during the second training step (steady state)."""

    peak: int
    base_weights: int
    lora_weights: int
    lora_grads: int
    optimizer_state: int
    lora_params: int
    base_params: int
    seconds: float

    @property
    def activations(self) -> int:
        """Everything at the peak that is not a weight or optimizer state: saved activations, temporaries, grads."""
        return self.peak - self.base_weights - self.lora_weights - self.optimizer_state


def _batch_for(shape: StepShape, model_config: dict, seed: int = 0):
    """A Batch of real CPU tensors with the step's shapes (the objective moves them to the device)."""
    import torch

    from hvtune.train.batches import Batch

    g = torch.Generator().manual_seed(seed)
    c, f, h, w = shape.latents
    b = shape.batch
    x0 = torch.randn(b, c, f, h, w, generator=g)
    cond = torch.zeros_like(x0)
    mask = torch.zeros(b, 1, f, h, w)
    image = None
    if shape.task == "i2v":
        cond[:, :, 0] = torch.randn(b, c, h, w, generator=g)
        mask[:, :, 0] = 1.0
        image = torch.randn(b, IMAGE_TOKENS, model_config["image_embed_dim"], generator=g)
    return Batch(
        latents=x0,
        cond_latents=cond,
        cond_mask=mask,
        image_embeds=image,
        prompt_embeds=torch.randn(b, shape.qwen_tokens, model_config["text_embed_dim"], generator=g),
        prompt_mask=torch.ones(b, shape.qwen_tokens, dtype=torch.int64),
        prompt_embeds_2=torch.randn(b, shape.byt5_tokens, model_config["text_embed_2_dim"], generator=g),
        prompt_mask_2=torch.ones(b, shape.byt5_tokens, dtype=torch.int64),
        sample_indices=list(range(b)),
        draws=list(range(b)),
    )


def _accelerator(cfg: TrainConfig, cpu: bool = True):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state and refuses another mixed_precision; the sweep simulates several
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu, gradient_accumulation_steps=1)


def _release_accelerator() -> None:
    """Forget the simulated step's accelerate state, so that a later Accelerator in this process (a training run after
    `hvtune check` printed its verdict, or the next simulation) may choose its own mixed precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def state_tensors(optimizer) -> list:
    import torch

    out = []
    for state in optimizer.state.values():
        out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out


def prepare_step(transformer, cfg: TrainConfig, device: str):
    """The trainer's setup on `transformer`: prepare_base, add_lora (seeded as the trainer seeds it),
    build_optimizer, and the optimizer's state allocated. Returns (the config the step runs with, LoRA params,
    optimizer). On meta, diffusers' offload hooks would copy weights to the CPU (there is no data to copy), so
    offload is left out and `offload_resident` accounts for it; a real run keeps it (on the CPU it moves nothing)."""
    import torch

    from hvtune.train.base_model import prepare_base
    from hvtune.train.lora import add_lora
    from hvtune.train.objective import counter_seed
    from hvtune.train.optim import build_optimizer

    meta = device == "meta"
    offload = {"enable_group_offload": False, "group_offload_use_stream": False} if meta else {}
    if meta:  # a chosen kernel's package need not exist where plan runs: the step is simulated with SDPA's memory
        offload["attention_mechanism"] = "diffusers"
    # the shift changes no tensor size; auto shift (0) would need the scheduler config, which plan does not read
    step_cfg = cfg.model_copy(update={**offload, "flow_schedule_shift": cfg.shift or 1.0})
    prepare_base(transformer, step_cfg, device)
    torch.manual_seed(counter_seed(cfg.seed, purpose="lora_init"))
    add_lora(transformer, step_cfg)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, step_cfg)
    _warm_optimizer(optimizer, params, meta=meta)
    return step_cfg, params, optimizer


def run_step(
    transformer, cfg: TrainConfig, shape: StepShape, *, device: str, autocast_device: str = "cuda", steps: int = 1
) -> StepMemory:
    """`prepare_step`, then `steps` x train.step.training_step on `transformer` (already built on `device`) under a
    TensorTracker for `device`; the peak is the last step's."""
    from hvtune.train.objective import schedule_options
    from hvtune.train.step import training_step

    started = time.perf_counter()
    meta = device == "meta"
    model_config = dict(transformer.config)
    step_cfg, params, optimizer = prepare_step(transformer, cfg, device)
    accelerator = _accelerator(step_cfg)
    batch = _batch_for(shape, model_config)
    # the trainer's other arguments for one process; t2v's empty image-token shape; no cached empty prompt
    step_args = dict(rank=0, empty=None, image_embed_shape=(0, model_config["image_embed_dim"]), device=device)
    step_args["schedule"] = schedule_options(step_cfg)
    base = [p for p in transformer.parameters() if not p.requires_grad] + list(transformer.buffers())
    memory = StepMemory(
        peak=0,
        base_weights=sum(tensor_bytes(t) for t in base),
        lora_weights=sum(tensor_bytes(p) for p in params),
        lora_grads=sum(p.numel() * 4 for p in params),
        optimizer_state=0,
        lora_params=sum(p.numel() for p in params),
        base_params=sum(p.numel() for p in transformer.parameters() if not p.requires_grad),
        seconds=0.0,
    )
    autocast = MetaAutocast(autocast_device, enabled=cfg.mixed_precision == "bf16") if meta else None
    if autocast is not None and cfg.gradient_checkpointing:
        recompute_under(transformer, autocast)
    tracker = TensorTracker(device, shadows=meta)
    tracker.adopt([*base, *params, *state_tensors(optimizer)])
    transformer.train()
    try:
        for i in range(steps):
            if i == steps - 1:
                tracker.reset_peak()
            with tracker, autocast or contextlib.nullcontext():
                loss = training_step(
                    accelerator, transformer, optimizer, params, batch, step_cfg, epoch=0, index=i, **step_args
                )
            del loss
            tracker.adopt(state_tensors(optimizer))
    finally:
        _release_accelerator()
    memory.peak = tracker.peak
    memory.optimizer_state = storage_bytes(state_tensors(optimizer), device)
    memory.seconds = time.perf_counter() - started
    return memory


def _warm_optimizer(optimizer, params, *, meta: bool) -> None:
    """Allocate the optimizer's state as its first step does (every later step runs with it), by one step on zero
    gradients, so the one step measured is a steady-state step. bitsandbytes' 8-bit AdamW allocates its state in
    `init_state` and then runs a kernel meta tensors cannot run: on meta its state comes from its own `init_state`
    and its `step` becomes a no-op (the update is in place: no memory of its own beyond the state)."""
    import torch

    if meta and hasattr(optimizer, "init_state"):
        for gindex, group in enumerate(optimizer.param_groups):
            for pindex, p in enumerate(group["params"]):
                if len(optimizer.state[p]) == 0:
                    optimizer.init_state(group, p, gindex, pindex)
        optimizer.step = lambda *a, **k: None
        return
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def compare_with_cpu(model_config: dict, cfg: TrainConfig, shape: StepShape) -> tuple[StepMemory, StepMemory]:
    """(predicted, measured): the same step of the same (small) architecture on meta tensors with the CPU's
    autocast rules, and for real on the CPU, both measured by the TensorTracker. The validation of the plan."""
    import torch
    from diffusers import HunyuanVideo15Transformer3DModel

    predicted = run_step(build_meta_transformer(model_config), cfg, shape, device="meta", autocast_device="cpu")
    torch.manual_seed(0)
    real = HunyuanVideo15Transformer3DModel(**model_config)
    measured = run_step(real, cfg, shape, device="cpu")
    return predicted, measured


def build_meta_transformer(model_config: dict):
    import torch
    from diffusers import HunyuanVideo15Transformer3DModel

    with torch.device("meta"):
        return HunyuanVideo15Transformer3DModel(**model_config)
