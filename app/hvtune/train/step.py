"""One training step: `training_step` runs a micro-batch (forward, backward, clipping, optimizer step when the
gradients sync); `step_loss` turns the micro-batches' losses into the optimizer step's loss, or stops the run when it
is not finite. The loop (`hvtune.trainer`) calls them, and so do `hvtune plan` and the benchmarks."""

from __future__ import annotations

import math
from collections.abc import Sequence

from hvtune.errors import UserError
from hvtune.train.objective import counter_seed, training_loss
from hvtune.train.optim import clip_gradients
from hvtune.train.sharding import clipping_accelerator, sync_replicated_gradients


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
            sync_replicated_gradients(accelerator, params)  # FSDP2: the replicated LoRA's gradient, averaged
            clip_gradients(clipping_accelerator(accelerator), params, cfg)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss


def step_loss(
    accelerator, micro_losses: list, step: int, *, samples: Sequence[str] = (), verify: str = "hvtune cache verify"
) -> float:
    """The loss of optimizer step `step`: the mean of its micro-batches' losses over all processes. NonFiniteLoss
    when it is NaN or infinite: nothing is saved, the last good checkpoint stays the one to resume from. The message
    names the step's `samples` (this process's) and suspects their cache entries (`verify`, the command that rehashes
    them) before the learning rate: a flipped byte in a latent gives a NaN at the first step that reads it."""
    import torch

    loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
    if not math.isfinite(loss):
        on = f" on sample(s) {', '.join(dict.fromkeys(samples))}" if samples else ""
        raise NonFiniteLoss(
            f"loss became {loss} at step {step}{on}; stopped without saving. The last good checkpoint is kept. "
            f"First run `{verify}` (a damaged cache entry does this); if every entry is intact, lower learning_rate "
            "and resume_from_checkpoint=latest"
        )
    return loss
