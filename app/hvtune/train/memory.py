"""The trainable model and what makes it fit: base precision, LoRA, gradient checkpointing, offload, optimizers.

Call order (the trainer's): `prepare_base(transformer, cfg, device)`, then `add_lora(transformer, cfg)`, then
`build_optimizer` over the parameters that require grad. Every memory option does something real:

- `base_model_precision`: `bf16` casts the frozen base to bf16; `int8-torchao` casts it to bf16 and quantizes its
  linear weights in place (torchao `Int8WeightOnlyConfig`, LoRA layers skipped), so the LoRA layers added afterwards
  wrap int8 base layers and stay float32; `no_change` follows `mixed_precision`
  (bf16 with bf16, as loaded with "no"), as in SimpleTuner. LoRA parameters are always float32.
- `lora_type: lycoris`: peft LoKr / LoHa layers instead of LoRA, shaped and scaled by LyCORIS' rules
  (`add_lycoris`; the rules in `hvtune.config.lycoris`). Everything below applies to them as to LoRA.
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
  has.
- `enable_model_cpu_offload`: in a training loop every transformer block runs every step, so whole-model offload would
  copy the 16 GB model twice per step; training only ever loads the transformer (the encoders ran in `hvtune cache`),
  so there is nothing else to offload while training. hvtune gives the flag the meaning it has in a pipeline at the
  one point where several models share the GPU, validation: the transformer moves to the CPU while the VAE decodes
  (`validation.render(offload_transformer_for_decode=...)`) and comes back afterwards. Never combined with group offload
  (the config refuses it, and so does `prepare_base`).
"""

from __future__ import annotations

import math
import re

import torch

from hvtune.config.schema import TrainConfig
from hvtune.errors import UserError

MAIN_BLOCK_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# In the last dual-stream block the model drops the text stream's output (forward() keeps only hidden_states after the
# loop), so these modules get no gradient (to_add_out, ff_context: None) or an all-zero one (add_q_proj: text queries
# only produce text outputs). LoRA on them would train nothing, and DDP would need find_unused_parameters=True.
LAST_BLOCK_DEAD = ("attn.to_add_out", "attn.add_q_proj", "ff_context.net.0.proj", "ff_context.net.2")


def default_target_modules() -> str:
    """A regex (peft full-matches it against module names): the brief's projections in the main dual-stream blocks,
    not the token refiner's same-named layers. The last block's dead modules are removed by `add_lora`."""
    names = "|".join(re.escape(t) for t in MAIN_BLOCK_TARGETS)
    return rf"transformer_blocks\.\d+\.attn\.({names})"


def dead_modules(transformer) -> list[str]:
    """Full names of the last block's modules whose LoRA would never get a (non-zero) gradient."""
    last = transformer.config.num_layers - 1
    return [f"transformer_blocks.{last}.{name}" for name in LAST_BLOCK_DEAD]


def lora_config(transformer, cfg: TrainConfig):
    """The peft LoraConfig for this run: rank, alpha (default = rank), dropout, init, targets minus the dead modules."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = cfg.lora_target_modules or default_target_modules()
    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank,
        lora_dropout=cfg.lora_dropout,
        init_lora_weights="gaussian" if cfg.lora_init_type == "gaussian" else True,
        target_modules=targets,
    )
    names = {name for name, _ in transformer.named_modules()}
    # exclude only what the targets would match: peft warns about an exclusion list that excluded nothing
    excluded = [
        name for name in dead_modules(transformer) if name in names and check_target_module_exists(config, name)
    ]
    if excluded:
        config.exclude_modules = excluded
    return config


ADAPTER_PARAMETER_MARKS = ("lora_", "lokr_", "hada_")  # peft's LoRA, LoKr and LoHa weight names


def is_adapter_parameter(name: str) -> bool:
    return any(mark in name for mark in ADAPTER_PARAMETER_MARKS)


def lora_parameters(transformer) -> list[torch.nn.Parameter]:
    return [p for name, p in transformer.named_parameters() if is_adapter_parameter(name)]


def add_lora(transformer, cfg: TrainConfig) -> None:
    """Inject a LoRA adapter through diffusers' PEFT integration (`transformer.add_adapter`). LoRA weights float32 and
    trainable, everything else frozen. LoRA A's random init draws from the global RNG: seed it before calling."""
    if cfg.lora_type == "lycoris":
        from hvtune.config.lycoris import read_lycoris_config

        add_lycoris(transformer, read_lycoris_config(cfg.lycoris_config))
    else:
        config = lora_config(transformer, cfg)
        try:
            transformer.add_adapter(config)
        except ValueError as e:  # peft: "Target modules ... not found in the base model"
            if "target" not in str(e).lower():
                raise
            raise UserError(f"lora_target_modules {cfg.lora_target_modules!r} match no layer of the transformer") from e
    _make_adapter_trainable(transformer)


def _make_adapter_trainable(transformer) -> None:
    device = _offload_device(transformer)
    frozen = []
    for name, param in transformer.named_parameters():
        if is_adapter_parameter(name):  # resident on the training device even when the base is offloaded
            param.data = param.data.to(device=device or param.device, dtype=torch.float32)
            param.requires_grad_(True)
        else:
            param.requires_grad_(False)
            frozen.append(name)
    # DDP (accelerate launch with N processes) would broadcast the whole frozen base from rank 0 at wrap time and
    # refuse a module whose parameters sit on two device types (an offloaded base on the CPU, LoRA on the GPU): it only
    # needs to know the LoRA weights, every rank loads the same base.
    transformer._ddp_params_and_buffers_to_ignore = frozen + [name for name, _ in transformer.named_buffers()]


def lycoris_targets(transformer, spec) -> dict[str, str]:
    """{Linear module name: the apply_preset class it sits in} for `spec`, minus the last block's dead modules."""
    dead = set(dead_modules(transformer))
    targets: dict[str, str] = {}
    for name, module in transformer.named_modules():
        cls = type(module).__name__
        if cls not in spec.target_classes:
            continue
        for sub, leaf in module.named_modules():
            full = f"{name}.{sub}" if sub else name
            if isinstance(leaf, torch.nn.Linear) and full not in dead:
                targets.setdefault(full, cls)
    return targets


def add_lycoris(transformer, spec) -> None:
    """peft LoKr / LoHa layers with LyCORIS' per-layer rules (hvtune.config.lycoris docstring): per-class factor, which
    halves are split, scale, and LyCORIS' init (w1 random, w2 zero). The adapter is named "default" like LoRA's."""
    from peft import LoHaConfig, LoKrConfig

    targets = lycoris_targets(transformer, spec)
    if not targets:
        classes = sorted({type(m).__name__ for m in transformer.modules()} & {"Attention", "FeedForward"})
        raise UserError(
            f"lycoris_config apply_preset.target_module {list(spec.target_classes)} matches no module of the "
            f"HunyuanVideo 1.5 transformer; its adaptable classes are {classes}"
        )
    common = dict(
        r=spec.dim,
        alpha=spec.alpha,
        rank_dropout=spec.rank_dropout,
        module_dropout=spec.module_dropout,
        target_modules=sorted(targets),
    )
    if spec.algo == "loha":
        transformer.add_adapter(LoHaConfig(**common))
        return
    transformer.add_adapter(
        LoKrConfig(**common, decompose_factor=spec.factor, decompose_both=spec.decompose_both, init_weights="lycoris")
    )
    for name, module in transformer.named_modules():
        if name in targets:
            _lycoris_lokr_layer(module, spec, spec.factor_for(targets[name]))


def _lycoris_lokr_layer(layer, spec, factor: int) -> None:
    """Rebuild one peft LoKr layer's weights with LyCORIS' shapes and scale (peft has no full_matrix and no per-class
    factor, and scales full w1 x full w2 by alpha / r where LyCORIS uses 1)."""
    from peft.tuners.lokr.layer import factorization

    base = layer.get_base_layer()
    out_l, out_k = factorization(base.out_features, factor)
    in_m, in_n = factorization(base.in_features, factor)
    use_w1 = not (spec.decompose_both and spec.dim < max(out_l, in_m) / 2)
    use_w2 = not (spec.dim < max(out_k, in_n) / 2 and not spec.full_matrix)
    for weights in (layer.lokr_w1, layer.lokr_w1_a, layer.lokr_w1_b, layer.lokr_w2, layer.lokr_w2_a, layer.lokr_w2_b):
        if "default" in weights:
            del weights["default"]
    layer.create_adapter_parameters("default", spec.dim, ((out_l, out_k), (in_m, in_n)), use_w1, use_w2, False)
    layer.reset_adapter_parameters_lycoris_way("default")
    layer.scaling["default"] = 1.0 if use_w1 and use_w2 else spec.alpha / spec.dim
    layer._move_adapter_to_device_of_base_layer("default")


def _offload_device(transformer) -> torch.device | None:
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


def prepare_base(transformer, cfg: TrainConfig, device: torch.device | str) -> None:
    """Attention path, precision, checkpointing and placement of the frozen base. Call before `add_lora`."""
    if any(is_adapter_parameter(name) for name, _ in transformer.named_parameters()):
        raise RuntimeError("prepare_base must run before add_lora (it casts, quantizes and offloads the base only)")
    device = torch.device(device)
    if cfg.enable_group_offload and cfg.enable_model_cpu_offload:
        raise UserError("enable_model_cpu_offload cannot be combined with enable_group_offload; choose one")
    if cfg.group_offload_use_stream and not cfg.enable_group_offload:
        raise UserError("group_offload_use_stream needs enable_group_offload: true")
    if cfg.enable_group_offload and cfg.group_offload_use_stream and device.type != "cuda":
        raise UserError(f"group_offload_use_stream needs a CUDA device (training device: {device}); set it to false")
    from hvtune.model.attention import use_key_padding_attention

    transformer.requires_grad_(False)
    use_key_padding_attention(transformer)
    if cfg.base_model_precision in ("bf16", "no_change") and base_dtype(cfg) == torch.bfloat16:
        transformer.to(torch.bfloat16)  # no_change follows mixed_precision (see base_dtype)
    elif cfg.base_model_precision == "int8-torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        transformer.to(torch.bfloat16)  # torchao's int8 weight-only path computes in the activation dtype (bf16)

        def base_linear(module: torch.nn.Module, fqn: str) -> bool:
            return isinstance(module, torch.nn.Linear) and "lora_" not in fqn

        quantize_(transformer, Int8WeightOnlyConfig(), filter_fn=base_linear)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
    if cfg.enable_group_offload:
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
    else:
        transformer.to(device)


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Optimizers by SimpleTuner's names (table: `simpletuner.OPTIMIZERS`), over the float32 LoRA parameters, with
    SimpleTuner's settings: the optimizer's own defaults, then `optimizer_config`, then `optimizer_beta1/2`.

    `adamw_bf16` (SimpleTuner's default) and `optimi-adamw` keep bf16 *parameters* in SimpleTuner and update them
    with stochastic rounding / Kahan summation. hvtune's trainable parameters are the LoRA weights, always float32
    (the bf16 part is the frozen base), so there is nothing to round: `torch.optim.AdamW` with the same settings
    computes that update. `bnb-*` are bitsandbytes' optimizers, `ao-adamw8bit` torchao's `AdamW8bit`."""
    from hvtune.config.simpletuner import OPTIMIZERS, optimizer_problem, optimizer_settings

    if problem := optimizer_problem(cfg.optimizer):
        raise UserError(f"optimizer {cfg.optimizer!r}: {problem}")
    # SimpleTuner's hyperparameters: the optimizer's own defaults, optimizer_config, optimizer_beta1/2
    kwargs = dict(lr=cfg.learning_rate, **optimizer_settings(
        cfg.optimizer, cfg.optimizer_config, cfg.optimizer_beta1, cfg.optimizer_beta2
    ))  # fmt: skip
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters: add_lora must run before build_optimizer")
    implementation = OPTIMIZERS[cfg.optimizer][0]
    if implementation == "torch.AdamW":
        return torch.optim.AdamW(params, **kwargs)
    if implementation == "torch.Adam":
        return torch.optim.Adam(params, **kwargs)
    if implementation == "torchao.AdamW8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, **kwargs)
    import bitsandbytes as bnb

    return getattr(bnb.optim, implementation.split(".")[1])(params, **kwargs)


def base_dtype(cfg: TrainConfig) -> torch.dtype | None:
    """dtype to load the frozen base in: bf16 for bf16 and int8-torchao, and for no_change when mixed_precision is
    bf16 (SimpleTuner's cmd_args.py `model_is_bf16`); None (as stored, fp32) for no_change without mixed precision."""
    if cfg.base_model_precision != "no_change" or cfg.mixed_precision == "bf16":
        return torch.bfloat16
    return None


def clip_gradients(accelerator, params: list[torch.nn.Parameter], cfg: TrainConfig) -> None:
    """SimpleTuner's clipping (helpers/training/trainer.py): nothing when max_grad_norm is 0; `grad_clip_method`
    "value" (its default) clamps every gradient element to [-max_grad_norm, max_grad_norm]
    (accelerator.clip_grad_value_), "norm" rescales the whole gradient to that norm (accelerator.clip_grad_norm_).
    `accelerator` None: torch's own functions (a single process without a gradient scaler)."""
    if cfg.max_grad_norm <= 0:
        return
    utils = accelerator if accelerator is not None else torch.nn.utils
    if cfg.grad_clip_method == "norm":
        utils.clip_grad_norm_(params, cfg.max_grad_norm)
    else:
        utils.clip_grad_value_(params, cfg.max_grad_norm)


def simpletuner_wave(name: str, cfg: TrainConfig):
    """lr factor per step of SimpleTuner's own schedules (helpers/training/custom_schedule.py, classes Cosine,
    CosineAnnealingHardRestarts, Sine as get_lr_scheduler builds them: T_0 = lr_warmup_steps, eta_min = lr_end, the
    default steps_per_epoch=-1, lr floored to 1e-9). With steps_per_epoch=-1, Cosine's T_cur is -step (a cosine
    wave of period 2 T_0 that never restarts; T_0 = 1000 when lr_warmup_steps is 0) and CosineAnnealingHardRestarts'
    T_cur is step % -1 = 0 (the lr stays at learning_rate). Its num_processes factors cancel: SimpleTuner steps the
    scheduler num_processes times per step over a period num_processes times longer."""
    base, eta = cfg.learning_rate, cfg.lr_end
    period = cfg.lr_warmup_steps if cfg.lr_warmup_steps > 0 else 1000

    def factor(step: int) -> float:
        if name == "cosine":
            lr = eta + (base - eta) * (1 + math.cos(math.pi * -step / period)) / 2
        elif name == "sine":
            lr = eta + (base - eta) * (0.5 * (1 + math.sin(math.pi * step / period)))
        else:  # cosine_with_restarts
            lr = eta + (base - eta) * (1 + math.cos(0.0)) / 2
        return math.floor(lr * 1e9) / 1e9 / base

    return factor


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """diffusers' `get_scheduler`: constant, constant_with_warmup, linear and cosine (linear warmup over
    `lr_warmup_steps`, then constant or a decay to 0 at `total_steps`). Stepped once per optimizer step.
    diffusers' plain `constant` ignores `lr_warmup_steps`; here a warmup asked for is a warmup, so `constant` with
    `lr_warmup_steps` > 0 runs as `constant_with_warmup` (the same lr after the warmup)."""
    from diffusers.optimization import get_scheduler

    from hvtune.config.simpletuner import scheduler_problem

    name = cfg.lr_scheduler
    if problem := scheduler_problem(name, cfg.lr_warmup_steps):
        raise UserError(f"lr_scheduler {name!r}: {problem}")
    if name in ("cosine", "cosine_with_restarts", "sine"):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, simpletuner_wave(name, cfg))
    if name == "polynomial":  # SimpleTuner passes lr_end and lr_power (helpers/training/custom_schedule.py)
        from diffusers.optimization import get_polynomial_decay_schedule_with_warmup

        return get_polynomial_decay_schedule_with_warmup(
            optimizer, cfg.lr_warmup_steps, total_steps, lr_end=cfg.lr_end, power=cfg.lr_power
        )
    return get_scheduler(
        name,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=total_steps,
    )
