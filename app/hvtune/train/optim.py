"""The optimizer (SimpleTuner's names, a name -> factory table), the learning-rate schedule and gradient clipping."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from hvtune.config.settings import TrainConfig
from hvtune.errors import UserError


def _bitsandbytes(name: str) -> Callable[..., torch.optim.Optimizer]:
    def build(params, **kwargs):
        import bitsandbytes as bnb

        return getattr(bnb.optim, name)(params, **kwargs)

    return build


def _torchao_adamw8bit(params, **kwargs) -> torch.optim.Optimizer:
    from torchao.optim import AdamW8bit

    return AdamW8bit(params, **kwargs)


# the implementations `hvtune.config.simpletuner.OPTIMIZERS` names: a new optimizer is one entry there and one here
OPTIMIZER_FACTORIES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "torch.AdamW": torch.optim.AdamW,
    "torch.Adam": torch.optim.Adam,
    "torchao.AdamW8bit": _torchao_adamw8bit,
    "bnb.AdamW": _bitsandbytes("AdamW"),
    "bnb.AdamW8bit": _bitsandbytes("AdamW8bit"),
}


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
    return OPTIMIZER_FACTORIES[OPTIMIZERS[cfg.optimizer][0]](params, **kwargs)


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
    """SimpleTuner's get_lr_scheduler (helpers/training/custom_schedule.py) for the name SimpleTuner runs
    (`simpletuner_scheduler`: `constant` with `lr_warmup_steps` > 0 is `constant_with_warmup`, `cosine_with_warmup`
    is `cosine`): diffusers' `get_scheduler` for constant, constant_with_warmup and linear (linear warmup over
    `lr_warmup_steps`, then constant or a decay to 0 at `total_steps`), diffusers' polynomial decay, and SimpleTuner's
    own cosine / cosine_with_restarts / sine (`simpletuner_wave`). Stepped once per optimizer step: the first step
    trains at the schedule's step-0 lr (0 during a warmup), as SimpleTuner's does."""
    from diffusers.optimization import get_scheduler

    from hvtune.config.simpletuner import scheduler_problem, simpletuner_scheduler

    name = simpletuner_scheduler(cfg.lr_scheduler, cfg.lr_warmup_steps)
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


def apply_learning_rate(lr_scheduler, learning_rate: float, log) -> None:
    """A checkpoint restores the schedule it was saved with; a learning_rate changed for the resumed run (the fix
    for a diverged run) must win, or the setting would silently do nothing."""
    if all(base == learning_rate for base in lr_scheduler.base_lrs):
        return
    log(f"learning_rate changed at resume: {lr_scheduler.base_lrs[0]:g} -> {learning_rate:g}")
    lr_scheduler.base_lrs = [learning_rate] * len(lr_scheduler.base_lrs)
    for group, factor in zip(lr_scheduler.optimizer.param_groups, lr_scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor(lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [g["lr"] for g in lr_scheduler.optimizer.param_groups]
