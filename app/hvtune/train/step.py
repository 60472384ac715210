"""One training step: `training_step` runs a micro-batch (forward, backward, clipping, optimizer step when the
gradients sync); `step_loss` turns the micro-batches' losses into the optimizer step's loss, or stops the run when it
is not finite. The loop (`hvtune.trainer`) calls them, and so do `hvtune plan` and the benchmarks."""

from __future__ import annotations

import math

from hvtune.errors import UserError
from hvtune.train.objective import counter_seed, training_loss
from hvtune.train.optim import clip_gradients


class TrainError(UserError):
    """Bad setup detected before or during training; the message says what to fix."""


class NonFiniteLoss(TrainError):
    exit_code = 1  # the input was fine; the run diverged


def training_step(
    accelerator,
    transformer,
    optimizer,
    params,
    batch,
    cfg,
    *,
    epoch,
    index,
    rank,
    empty,
    image_embed_shape,
    device,
    schedule: dict,
):
    """One micro-batch: forward (the objective) under autocast, backward, clipping and the optimizer step when the
    gradients sync. The loop calls it, and so does `hvtune plan` on the full-size model without memory."""
    import torch

    with accelerator.accumulate(transformer):
        # LoRA dropout draws from the global RNG: key it on the position so resume sees the same masks
        torch.manual_seed(counter_seed(cfg.seed, epoch, index, rank, purpose="dropout"))
        with accelerator.autocast():
            loss, _ = training_loss(
                transformer,
                batch,
                seed=cfg.seed,
                epoch=epoch,
                **schedule,
                empty_prompt=empty,
                image_embed_shape=image_embed_shape,
                device=device,
            )
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            clip_gradients(accelerator, params, cfg)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss


def step_loss(accelerator, micro_losses: list, step: int) -> float:
    """The loss of optimizer step `step`: the mean of its micro-batches' losses over all processes. NonFiniteLoss
    when it is NaN or infinite: nothing is saved, the last good checkpoint stays the one to resume from."""
    import torch

    loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
    if not math.isfinite(loss):
        raise NonFiniteLoss(
            f"loss became {loss} at step {step}; stopped without saving. "
            "The last good checkpoint is kept: lower learning_rate and resume_from_checkpoint=latest"
        )
    return loss
