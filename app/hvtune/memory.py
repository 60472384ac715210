"""The trainable model and what makes it fit: base precision, LoRA, gradient checkpointing, offload, optimizers.

Memory options follow SimpleTuner's guide, and each one does something real:
- `base_model_precision`: bf16 casts the frozen base to bf16; int8-torchao quantizes its linear weights
  (torchao Int8WeightOnlyConfig) before LoRA is added, so LoRA layers stay full precision; no_change keeps the dtype.
- `gradient_checkpointing`: diffusers' block-level activation recomputation.
- `enable_group_offload`: diffusers group offload; weights live on the CPU and groups of blocks are moved to the GPU
  as they run (`group_offload_use_stream` overlaps the copies with compute: CUDA only).
- `enable_model_cpu_offload`: in a training loop every transformer block runs every step, so whole-model offload
  would copy 16 GB per step; as in SimpleTuner it applies to validation: the transformer moves to the CPU while the
  VAE decodes (the decode's peak is then the VAE's alone) and comes back after. Never with stream offload.
LoRA parameters are always float32.
"""

from __future__ import annotations

import torch

from .config import TrainConfig, UserError

MAIN_BLOCK_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def default_target_modules(num_layers: int) -> str:
    """A regex over module names: the brief's projections in the main dual-stream blocks, not the token refiner.
    The last block's text output is dropped by the model, so its `to_add_out` never gets a gradient (DDP would need
    find_unused_parameters) and its `add_q_proj` only ever gets zeros (text queries only feed text outputs): both
    are left out rather than trained to nothing."""
    names = "|".join(t.replace(".", r"\.") for t in MAIN_BLOCK_TARGETS)
    last = num_layers - 1
    not_dead_in_last_block = rf"(?!{last}\.attn\.(to_add_out|add_q_proj)$)"
    return rf"^transformer_blocks\.{not_dead_in_last_block}\d+\.attn\.({names})$"


def add_lora(transformer, cfg: TrainConfig) -> None:
    from peft import LoraConfig

    targets = cfg.lora_target_modules or default_target_modules(transformer.config.num_layers)
    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank,
        lora_dropout=cfg.lora_dropout,
        init_lora_weights="gaussian" if cfg.lora_init_type == "gaussian" else True,
        target_modules=targets,
    )
    transformer.add_adapter(config)
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)


def prepare_base(transformer, cfg: TrainConfig, device: torch.device | str) -> None:
    """Precision, checkpointing and placement of the frozen base; call before add_lora."""
    transformer.requires_grad_(False)
    if cfg.base_model_precision == "bf16":
        transformer.to(torch.bfloat16)
    elif cfg.base_model_precision == "int8-torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        transformer.to(torch.bfloat16)
        quantize_(transformer, Int8WeightOnlyConfig())
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    device = torch.device(device)
    if cfg.enable_group_offload:
        if cfg.group_offload_use_stream and device.type != "cuda":
            raise UserError("group_offload_use_stream needs a CUDA device; set it to false")
        transformer.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type=cfg.group_offload_type,
            num_blocks_per_group=cfg.group_offload_blocks_per_group
            if cfg.group_offload_type == "block_level"
            else None,
            use_stream=cfg.group_offload_use_stream,
        )
    else:
        transformer.to(device)


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """`adamw`: torch AdamW. `adamw_bf16`: SimpleTuner's name for AdamW on a bf16 model; here the base is bf16 and the
    LoRA weights fp32, so it is torch AdamW over the fp32 LoRA parameters (no stochastic rounding needed).
    `adamw8bit`: bitsandbytes AdamW8bit (8-bit optimizer states)."""
    kwargs = dict(
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )
    if cfg.optimizer in ("adamw", "adamw_bf16"):
        return torch.optim.AdamW(params, **kwargs)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    raise UserError(f"optimizer {cfg.optimizer!r} is not supported")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=total_steps,
    )
