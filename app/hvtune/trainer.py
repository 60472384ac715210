"""The training loop on accelerate: reads the cache, trains the LoRA, checkpoints, validates, exports, records.

Every random draw is keyed on (seed, epoch, draw) in `objective`, and the global batch order in `batches.plan_epoch`
is the same for any number of processes; each process takes its slice of the global batch. So 1 process with
batch 2 and 2 processes with batch 1 see the same samples with the same noise, and resuming from a checkpoint
continues exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .batches import load_batch, plan_epoch, text_entry
from .checkpoints import LoopState, find_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, ResolvedConfig, UserError, check_device_support
from .export import adapter_config, lora_state_dict, save_comfyui_lora, save_diffusers_lora, to_comfyui
from .files import write_json_atomic
from .manifest import load_manifest
from .memory import add_lora, build_lr_scheduler, build_optimizer, prepare_base
from .objective import counter_seed, training_loss
from .record import LossLog, apply_determinism, environment, plot_losses, sha256_json
from .registry import detect_device, load_scheduler, load_transformer, load_vae, resolve_model
from .status import RunStatus
from .validation import ImageCondition, TextCondition, sample_video, validation_dir


class TrainError(UserError):
    """Bad setup detected before or during training; the message says what to fix."""


class NonFiniteLoss(TrainError):
    exit_code = 1  # the input was fine; the run diverged


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    stopped_early: bool
    lora_path: Path | None
    is_main_process: bool = True


class _StopFlag:
    """SIGTERM (docker stop) asks for a checkpoint at the next step boundary instead of dying mid-step."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _check_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        raise TrainError(
            f"output_dir {path} is not writable ({e.strerror}); fix its permissions or pick another"
        ) from e


def _text_condition(manifest, key) -> TextCondition:
    return TextCondition(*text_entry(manifest, key))


def train(resolved: ResolvedConfig, *, max_steps_this_run: int | None = None) -> TrainResult:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
    from peft.utils import set_peft_model_state_dict
    from tqdm import tqdm

    cfg = resolved.train
    problems = check_device_support(cfg, detect_device(), str(resolved.config_path or "config"))
    if problems:
        raise ConfigError(problems)
    out = Path(cfg.output_dir)
    _check_output_dir(out)
    manifest = load_manifest(resolved)
    started = time.time()
    determinism = apply_determinism(cfg.deterministic)

    trackers = _trackers(cfg)
    accelerator = Accelerator(
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs" / "tensorboard")),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process
    status = RunStatus(out, enabled=main)  # status.json for the run page
    status.phase("starting")
    if trackers:
        scalars = {k: v for k, v in cfg.model_dump().items() if isinstance(v, int | float | str | bool)}
        accelerator.init_trackers(os.environ.get("WANDB_PROJECT", "hvtune"), config=scalars)
    components = ["transformer", "scheduler"] + (["vae"] if _validation_due(cfg, 0, 1, final=True) else [])
    paths = resolve_model(cfg, components)

    dtype = {"bf16": torch.bfloat16, "int8-torchao": torch.bfloat16}.get(cfg.base_model_precision)
    transformer = load_transformer(paths, dtype=dtype)
    transformer.requires_grad_(False)
    prepare_base(transformer, cfg, device)  # precision, checkpointing, offload: before LoRA so LoRA stays fp32
    torch.manual_seed(counter_seed(cfg.seed, purpose="lora_init"))  # LoRA A init uses the global RNG
    add_lora(transformer, cfg)
    params = [p for p in transformer.parameters() if p.requires_grad]
    try:  # fail now, not after hours of training, if the targets have no ComfyUI name
        to_comfyui(lora_state_dict(transformer), alpha=float(cfg.lora_alpha or cfg.lora_rank))
    except ValueError as e:
        raise TrainError(f"lora_target_modules: {e}; the ComfyUI export could not be written") from e
    optimizer = build_optimizer(params, cfg)

    global_batch = cfg.train_batch_size * world
    batches_per_epoch = len(plan_epoch(manifest, global_batch_size=global_batch, seed=cfg.seed, epoch=0))
    if batches_per_epoch == 0:
        raise TrainError(f"no full batch of {global_batch} samples in any bucket: lower train_batch_size or add clips")
    steps_per_epoch = max(1, batches_per_epoch // cfg.gradient_accumulation_steps)
    total_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
    lr_scheduler = build_lr_scheduler(optimizer, cfg, total_steps)

    offloaded = cfg.enable_group_offload
    transformer, optimizer = accelerator.prepare(transformer, optimizer, device_placement=[not offloaded, True])
    model = accelerator.unwrap_model(transformer)

    state = LoopState(global_step=0, epoch=0, batch_in_epoch=0, loss_history=[])
    resume = find_checkpoint(out, cfg.resume_from_checkpoint)
    if resume is not None:
        state, lora, opt_state, sched_state = load_checkpoint(resume)
        set_peft_model_state_dict(model, lora)
        optimizer.load_state_dict(opt_state)
        lr_scheduler.load_state_dict(sched_state)
        _apply_learning_rate(lr_scheduler, cfg.learning_rate, accelerator.print)
        accelerator.print(f"resumed from {resume} at step {state.global_step}")

    loss_log = LossLog(out / "logs" / "loss.jsonl", resume_from_step=state.global_step) if main else None
    stop = _StopFlag()
    bar = tqdm(
        total=total_steps, initial=state.global_step, disable=not main, desc="train", unit="step", dynamic_ncols=True
    )
    image_embed_shape = (0, model.config.image_embed_dim)  # t2v: no image tokens
    empty = text_entry(manifest, manifest.empty_prompt_key)
    stopped_early, step_started, micro_losses = False, time.time(), []
    status.start(resolved, total_steps, state.global_step)
    steps_this_run = 0
    try:
        while state.global_step < total_steps:
            plan = plan_epoch(manifest, global_batch_size=global_batch, seed=cfg.seed, epoch=state.epoch)
            for index in range(state.batch_in_epoch, len(plan)):
                items = plan[index][rank * cfg.train_batch_size : (rank + 1) * cfg.train_batch_size]
                batch = load_batch(manifest, items)
                with accelerator.accumulate(transformer):
                    # LoRA dropout draws from the global RNG: key it on the position so resume sees the same masks
                    torch.manual_seed(counter_seed(cfg.seed, state.epoch, index, rank, purpose="dropout"))
                    with accelerator.autocast():
                        loss, _ = training_loss(
                            transformer,
                            batch,
                            seed=cfg.seed,
                            epoch=state.epoch,
                            shift=cfg.flow_schedule_shift,
                            mode=cfg.timestep_sampling,
                            caption_dropout_p=cfg.caption_dropout_probability,
                            empty_prompt=empty,
                            image_embed_shape=image_embed_shape,
                            device=device,
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                micro_losses.append(loss.detach())
                state.batch_in_epoch = index + 1
                if not accelerator.sync_gradients:
                    continue
                lr_scheduler.step()
                step_loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
                micro_losses = []
                if not math.isfinite(step_loss):
                    raise NonFiniteLoss(
                        f"loss became {step_loss} at step {state.global_step + 1}; stopped without saving. "
                        "The last good checkpoint is kept: lower learning_rate and resume_from_checkpoint=latest"
                    )
                state.global_step += 1
                steps_this_run += 1
                state.loss_history.append(step_loss)
                now = time.time()
                lr = lr_scheduler.get_last_lr()[0]
                if main:
                    loss_log.write(
                        step=state.global_step,
                        loss=step_loss,
                        lr=lr,
                        epoch=state.epoch,
                        seconds=round(now - step_started, 4),
                    )
                if trackers:
                    accelerator.log({"train/loss": step_loss, "train/lr": lr}, step=state.global_step)
                status.step(state.global_step, loss=step_loss, lr=lr, seconds=now - step_started)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", s_step=f"{now - step_started:.2f}")
                bar.update(1)
                step_started = now
                stop_now = _agree(accelerator, stop.requested)
                last = state.global_step >= total_steps
                limited = max_steps_this_run is not None and steps_this_run >= max_steps_this_run
                if main and (state.global_step % cfg.checkpointing_steps == 0 or stop_now or limited) and not last:
                    status.phase("checkpointing")
                    _checkpoint(out, state, model, optimizer, lr_scheduler, cfg.checkpoints_total_limit)
                if _validation_due(cfg, state.global_step, total_steps, final=last) and main:
                    status.phase("validating")
                    _validate(cfg, manifest, model, paths, state.global_step, device)
                if stop_now or limited:
                    stopped_early = not last
                    if stop_now:
                        accelerator.print(
                            f"SIGTERM: checkpoint written at step {state.global_step}; "
                            "resume with resume_from_checkpoint=latest"
                        )
                    break
                if last:
                    break
            else:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                continue
            break
    finally:
        stop.restore()
        bar.close()
        if loss_log is not None:
            loss_log.close()

    accelerator.wait_for_everyone()
    lora_path = None
    if main and not stopped_early:
        lora_path = _export(cfg, model, out)
        losses = [(i + 1, v) for i, v in enumerate(state.loss_history)]
        plot_losses(out / "loss.png", {"train": losses}, f"{cfg.model_flavour} LoRA rank {cfg.lora_rank}")
    if main:
        write_json_atomic(
            out / "run.json",
            _run_record(resolved, manifest, paths, determinism, world, state, started, stopped_early, lora_path),
        )
    reason = f"stop requested: checkpoint at step {state.global_step}" if stop.requested else None
    status.finish(stopped_early=stopped_early, reason=reason, step=state.global_step)
    accelerator.end_training()
    return TrainResult(out, state.global_step, stopped_early, lora_path, main)


def _apply_learning_rate(lr_scheduler, learning_rate: float, log) -> None:
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


def _agree(accelerator, flag: bool) -> bool:
    """All processes stop together: any one that got SIGTERM stops them all."""
    import torch

    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def _validation_due(cfg, step: int, total: int, *, final: bool) -> bool:
    if cfg.validation_disable:
        return False
    return final or (cfg.validation_steps > 0 and step % cfg.validation_steps == 0)


def _checkpoint(out, state, model, optimizer, lr_scheduler, keep) -> Path:
    return save_checkpoint(out, state, lora_state_dict(model), optimizer.state_dict(), lr_scheduler.state_dict(), keep)


def _validate(cfg, manifest, model, paths, step: int, device) -> list[Path]:
    from .media import write_video

    vae = load_vae(paths).to(device)
    if cfg.vae_enable_tiling:
        vae.enable_tiling()
    scheduler = load_scheduler(paths)
    image = None
    if manifest.task == "i2v":
        cond_latent, image_embeds = manifest.validation_image_condition()
        image = ImageCondition(cond_latent, image_embeds)
    width, height = cfg.validation_size
    if image is not None:  # the cached condition fixes the size
        height = image.cond_latent.shape[-2] * vae.spatial_compression_ratio
        width = image.cond_latent.shape[-1] * vae.spatial_compression_ratio
    was_training = model.training
    model.eval()
    frames = sample_video(
        model,
        vae,
        scheduler,
        prompt=_text_condition(manifest, manifest.validation_prompt_key),
        negative=_text_condition(manifest, manifest.validation_negative_key),
        width=width,
        height=height,
        num_frames=cfg.validation_num_video_frames,
        num_inference_steps=cfg.validation_num_inference_steps,
        guidance_scale=cfg.validation_guidance,
        seed=cfg.validation_seed if cfg.validation_seed is not None else cfg.seed,
        image=image,
        device=device,
        offload_transformer_for_decode=cfg.enable_model_cpu_offload and not cfg.enable_group_offload,
    )
    model.train(was_training)
    target = validation_dir(cfg.output_dir, step) / "validation_0.mp4"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_video(target, frames, fps=cfg.validation_fps)
    return [target]


def _export(cfg, model, out: Path) -> Path:
    state_dict = lora_state_dict(model)
    meta = {
        "hvtune.flavour": cfg.model_flavour,
        "hvtune.rank": str(cfg.lora_rank),
        "hvtune.alpha": str(cfg.lora_alpha or cfg.lora_rank),
    }
    path = save_diffusers_lora(state_dict, out, meta, adapter_config(model))
    save_comfyui_lora(state_dict, out / "comfyui_lora.safetensors", alpha=float(cfg.lora_alpha or cfg.lora_rank))
    return path


def _trackers(cfg) -> list[str]:
    """accelerate trackers for `report_to`: TensorBoard always (unless "none"), wandb when asked and configured."""
    if cfg.report_to == "none":
        return []
    if cfg.report_to == "wandb":
        from importlib.util import find_spec

        if find_spec("wandb") is None:
            print("notice: report_to=wandb but wandb is not installed (pip install wandb): TensorBoard only")
        elif os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
            return ["tensorboard", "wandb"]
        else:
            print("notice: report_to=wandb but WANDB_API_KEY is not set: logging to TensorBoard only")
    return ["tensorboard"]


def _run_record(resolved, manifest, paths, determinism, world, state, started, stopped_early, lora_path) -> dict:
    import hashlib

    lora_sha = hashlib.sha256(lora_path.read_bytes()).hexdigest() if lora_path else None
    record = resolved.to_record()
    return {
        "hvtune_run": 1,
        "config_hash": sha256_json(record["config"]),
        "resolved": record,
        "seeds": {"seed": resolved.train.seed, "validation_seed": resolved.train.validation_seed},
        "world_size": world,
        "global_step": state.global_step,
        "stopped_early": stopped_early,
        "dataset_manifest_hash": manifest.samples_hash,
        "cache_fingerprint": manifest.fingerprint,
        "model": paths.record(),
        "determinism": determinism,
        "environment": environment(),
        "timings": {"total_s": round(time.time() - started, 2)},
        "outputs": {
            "lora": str(lora_path) if lora_path else None,
            "lora_sha256": lora_sha,
            "loss_log": "logs/loss.jsonl",
        },
    }
