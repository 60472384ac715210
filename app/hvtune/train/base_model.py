"""The frozen base transformer and what makes it fit: attention path, base precision, gradient checkpointing, offload.

Call order (the trainer's): `prepare_base(transformer, cfg, device)`, then `hvtune.train.lora.add_lora(transformer,
cfg)`, then `hvtune.train.optim.build_optimizer` over the parameters that require grad. Every memory option does
something real:

- `base_model_precision`: `bf16` casts the frozen base to bf16; `int8-torchao` casts it to bf16 and quantizes its
  linear weights in place (torchao `Int8WeightOnlyConfig`, LoRA layers skipped), so the LoRA layers added afterwards
  wrap int8 base layers and stay float32; `no_change` follows `mixed_precision`
  (bf16 with bf16, as loaded with "no"), as in SimpleTuner. LoRA parameters are always float32. The fp8 bases
  (`fp8_base`) convert the frozen blocks' linear layers only; LoRA layers are added afterwards and stay float32.
- `gradient_checkpointing`: diffusers' block-level activation recomputation (`enable_gradient_checkpointing`).
- `enable_group_offload`: diffusers group offload (`enable_group_offload`, offload device = CPU): the frozen base
  weights live on the CPU and groups of blocks (`block_level`, `group_offload_blocks_per_group` per group) or single
  layers (`leaf_level`) are copied to the GPU as they run; `group_offload_use_stream` overlaps the copies with compute
  and needs CUDA (a clear error otherwise). diffusers' offload is written for frozen weights: it moves whatever a
  block holds at each call and, with streams, restores the CPU copies it took at setup. Trainable LoRA weights must not
  take part (their gradients and optimizer state would sit on another device than the weights, and with streams the
  LoRA weights have no CPU copy at all), so `prepare_base` pins every offload group to the base parameters that
  exist when it is applied, and `add_lora` keeps the LoRA weights resident on the training device (rank 16 on all
  54 blocks: ~110 MB in fp32).
- attention: `hvtune.model.attention.KeyPaddingAttnProcessor` on every block: SDPA gets no mask (and may use its flash
  kernel) when the batch has no padding, and a (B, 1, 1, S) key mask instead of the dense (B, 1, S, S) one when it
  has; `attention_mechanism` picks the dispatcher's kernel (`hvtune.config.kernels`).
- `enable_model_cpu_offload`: in a training loop every transformer block runs every step, so whole-model offload would
  copy the 16 GB model twice per step; training only ever loads the transformer (the encoders ran in `hvtune cache`),
  so there is nothing else to offload while training. hvtune gives the flag the meaning it has in a pipeline at the
  one point where several models share the GPU, validation: the transformer moves to the CPU while the VAE decodes
  (`hvtune.output.validation.sample_video(offload_transformer_for_decode=...)`) and comes back afterwards. Never
  combined with group offload (the config refuses it, and so does `prepare_base`).
"""

from __future__ import annotations

import torch

from hvtune.config.kernels import FP8_PRECISIONS, fp8_problem
from hvtune.config.settings import TrainConfig
from hvtune.errors import UserError
from hvtune.model.registry import detect_device

ADAPTER_PARAMETER_MARKS = ("lora_", "lokr_", "hada_")  # peft's LoRA, LoKr and LoHa weight names: not the base's


def is_adapter_parameter(name: str) -> bool:
    return any(mark in name for mark in ADAPTER_PARAMETER_MARKS)


def base_dtype(cfg: TrainConfig) -> torch.dtype | None:
    """dtype to load the frozen base in: bf16 for bf16 and int8-torchao, and for no_change when mixed_precision is
    bf16 (SimpleTuner's cmd_args.py `model_is_bf16`); None (as stored, fp32) for no_change without mixed precision."""
    if cfg.base_model_precision != "no_change" or cfg.mixed_precision == "bf16":
        return torch.bfloat16
    return None


def prepare_base(transformer, cfg: TrainConfig, device: torch.device | str) -> None:
    """Attention path, precision, checkpointing and placement of the frozen base. Call before `add_lora`."""
    if any(is_adapter_parameter(name) for name, _ in transformer.named_parameters()):
        raise RuntimeError("prepare_base must run before add_lora (it casts, quantizes and offloads the base only)")
    device = torch.device(device)
    check_offload(cfg, device)
    machine = "cpu" if device.type in ("cpu", "meta") else detect_device()  # meta: plan simulates another card
    if device.type != "meta" and (rule := fp8_problem(cfg.base_model_precision, machine)):
        raise UserError(f"base_model_precision {cfg.base_model_precision}: {rule}")  # check says it first
    from hvtune.config.kernels import attention_backends
    from hvtune.model.attention import use_key_padding_attention

    transformer.requires_grad_(False)
    use_key_padding_attention(transformer, *attention_backends(cfg.attention_mechanism, cfg.sageattention_usage))
    _set_precision(transformer, cfg)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
    if cfg.enable_group_offload:
        _group_offload(transformer, cfg, device)
    else:
        transformer.to(device)


def _set_precision(transformer, cfg: TrainConfig) -> None:
    if cfg.base_model_precision in ("bf16", "no_change") and base_dtype(cfg) == torch.bfloat16:
        transformer.to(torch.bfloat16)  # no_change follows mixed_precision (see base_dtype)
    elif cfg.base_model_precision == "int8-torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        transformer.to(torch.bfloat16)  # torchao's int8 weight-only path computes in the activation dtype (bf16)

        def base_linear(module: torch.nn.Module, fqn: str) -> bool:
            return isinstance(module, torch.nn.Linear) and "lora_" not in fqn

        quantize_(transformer, Int8WeightOnlyConfig(), filter_fn=base_linear)
    elif cfg.base_model_precision in FP8_PRECISIONS:
        transformer.to(torch.bfloat16)
        fp8_base(transformer, cfg.base_model_precision)


def fp8_linear(module: torch.nn.Module, fqn: str) -> bool:
    """The linear layers an fp8 base converts: those of the repeated blocks (98% of the weights) whose widths are
    multiples of 16 (what fp8 matmul kernels accept); embedders, refiner and output layer stay bf16, as do LoRA
    layers (added afterwards; `lora_` guards a second call)."""
    return (
        isinstance(module, torch.nn.Linear)
        and fqn.startswith("transformer_blocks.")
        and "lora_" not in fqn
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def fp8_base(transformer, precision: str) -> int:
    """SimpleTuner's torchao fp8 names on the frozen blocks' linears; returns the number of layers converted.

    - `fp8-torchao`: torchao's float8 training path (`convert_to_float8_training`, dynamic tensor-wise scales): the
      forward and the input-gradient matmuls run in fp8 (e4m3 / e5m2 for gradients), the weights stay bf16 in memory.
      (SimpleTuner quantizes with `Float8DynamicActivationFloat8WeightConfig`, an inference config that has no
      backward without SimpleTuner's own patches; torchao's training path is the maintained one with a backward.)
    - `fp8wo-torchao`: `Float8WeightOnlyConfig`, as SimpleTuner: weights stored in fp8 e4m3 with one scale per
      output row (half of bf16's bytes), dequantized to bf16 for every matmul (no fp8 matmul needed)."""
    converted = [name for name, module in transformer.named_modules() if fp8_linear(module, name)]
    if precision == "fp8-torchao":
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(transformer, module_filter_fn=fp8_linear)
    else:
        from torchao.quantization import Float8WeightOnlyConfig, quantize_

        quantize_(transformer, Float8WeightOnlyConfig(), filter_fn=fp8_linear)
    return len(converted)


# ------------------------------------------------------------------------------------------------------------ offload


def check_offload(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse the offload settings that cannot work together or on this device: config's one rule
    (`config.rules.offload_conflicts`), asked again for a config that did not come through `load_config`."""
    from hvtune.config.rules import offload_conflicts

    conflicts = offload_conflicts(cfg, device.type)
    if conflicts:
        raise UserError("; ".join(f"{key}: {why}" for key, why in conflicts))


def _group_offload(transformer, cfg: TrainConfig, device: torch.device) -> None:
    block_level = cfg.group_offload_type == "block_level"
    transformer.enable_group_offload(
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type=cfg.group_offload_type,
        num_blocks_per_group=cfg.group_offload_blocks_per_group if block_level else None,
        use_stream=cfg.group_offload_use_stream,
    )
    if _pin_offload_groups(transformer) == 0:
        raise RuntimeError("enable_group_offload installed no offload hooks")


def offload_device(transformer) -> torch.device | None:
    """The device group offload computes on, or None when the transformer is not offloaded."""
    from diffusers.hooks.group_offloading import _get_group_onload_device, _is_group_offload_enabled

    return _get_group_onload_device(transformer) if _is_group_offload_enabled(transformer) else None


def _pin_offload_groups(transformer) -> int:
    """Make every diffusers offload group move a fixed list of tensors (the ones that exist now) instead of
    `module.parameters()` at each call, so LoRA weights injected later stay where `add_lora` puts them.
    Returns the number of groups (0 means offload is not active)."""
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    groups = {}
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(_GROUP_OFFLOADING) if registry is not None else None
        if hook is not None:
            groups[id(hook.group)] = hook.group
    for group in groups.values():
        if group.modules:
            params = [p for m in group.modules for p in m.parameters()]
            buffers = [b for m in group.modules for b in m.buffers()]
            group.parameters = list(dict.fromkeys([*params, *group.parameters]))
            group.buffers = list(dict.fromkeys([*buffers, *group.buffers]))
            group.modules = []
    return len(groups)
