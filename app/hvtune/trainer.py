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

from hvtune.cache.manifest import load_manifest
from hvtune.config.settings import ConfigError, ResolvedConfig, UserError, check_device_support, mask_secrets
from hvtune.files import disk_full_message, free_space_problem, is_disk_full, writable_dir_problem, write_json_atomic
from hvtune.model.registry import detect_device, load_scheduler, load_transformer, load_vae, resolve_model
from hvtune.output.checkpoints import (
    CheckpointError,
    LoopState,
    clear_run_outputs,
    load_checkpoint,
    plan_start,
    run_identity,
    save_checkpoint,
)
from hvtune.output.comfyui import to_comfyui
from hvtune.output.export import (
    adapter_config,
    adapter_scales,
    lora_state_dict,
    lycoris_metadata,
    save_comfyui_lora,
    save_diffusers_lora,
)
from hvtune.output.progress import TrainProgress
from hvtune.output.record import LossLog, apply_determinism, environment, plot_losses, sha256_json
from hvtune.output.status import RunStatus
from hvtune.output.validation import (
    ImageCondition,
    TextCondition,
    dataset_validation_inputs,
    sample_video,
    validation_dir,
)
from hvtune.train import ema as lora_ema
from hvtune.train.batches import load_batch, plan_epoch, text_entry
from hvtune.train.memory import add_lora, base_dtype, build_lr_scheduler, build_optimizer, clip_gradients, prepare_base
from hvtune.train.objective import counter_seed, schedule_options, training_loss


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
    already_finished: bool = False  # the run in output_dir had finished: nothing was trained


class _StopFlag:
    """SIGTERM (docker stop) and a first Ctrl-C ask for a checkpoint at the next step boundary instead of dying
    mid-step and losing the steps since the last checkpoint; a second Ctrl-C stops at once."""

    def __init__(self, log):
        self.requested: str | None = None  # the signal's name
        self._log = log
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if signum == signal.SIGINT:
            self._log("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again stops at once, losing it)")

    def restore(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _check_output_dir(path: Path) -> None:
    problem = writable_dir_problem(path)
    if problem:
        raise TrainError(f"output_dir: {problem}")
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
    global_batch = cfg.train_batch_size * world
    batches_per_epoch = len(plan_epoch(manifest, global_batch_size=global_batch, seed=cfg.seed, epoch=0))
    if batches_per_epoch == 0:
        raise TrainError(f"no full batch of {global_batch} samples in any bucket: lower train_batch_size or add clips")
    steps_per_epoch = max(1, batches_per_epoch // cfg.gradient_accumulation_steps)
    total_steps = cfg.train_steps_limit or cfg.num_train_epochs * steps_per_epoch
    identity = run_identity(cfg.model_dump(), manifest.samples_hash)
    start = plan_start(out, cfg.resume_from_checkpoint, identity, total_steps, overwrite=cfg.overwrite_output_dir)
    if start.finished_at is not None:  # a restarted container, or the same command twice: keep the outputs
        lora = out / "pytorch_lora_weights.safetensors"
        return TrainResult(out, start.finished_at, False, lora if lora.is_file() else None, main, already_finished=True)
    if start.clear and main:
        accelerator.print(f"overwrite_output_dir: removing the previous run's outputs in {out}")
        clear_run_outputs(start.clear)
    accelerator.wait_for_everyone()
    for notice in start.notices:
        accelerator.print(f"notice: {notice}")
    status = RunStatus(out, enabled=main)  # status.json for the run page
    status.phase("starting")
    if trackers:
        scalars = {k: v for k, v in mask_secrets(cfg.model_dump()).items() if isinstance(v, int | float | str | bool)}
        run_name = {"wandb": {"name": cfg.tracker_run_name}} if cfg.tracker_run_name else {}
        accelerator.init_trackers(
            os.environ.get("WANDB_PROJECT", cfg.tracker_project_name), config=scalars, init_kwargs=run_name
        )
    components = ["transformer", "scheduler"] + (["vae"] if _validation_due(cfg, 0, 1, final=True) else [])
    paths = resolve_model(cfg, components)

    transformer = load_transformer(paths, dtype=base_dtype(cfg))
    transformer.requires_grad_(False)
    prepare_base(transformer, cfg, device)  # precision, checkpointing, offload: before LoRA so LoRA stays fp32
    torch.manual_seed(counter_seed(cfg.seed, purpose="lora_init"))  # LoRA A init uses the global RNG
    add_lora(transformer, cfg)
    params = [p for p in transformer.parameters() if p.requires_grad]
    try:  # fail now, not after hours of training, if the targets have no ComfyUI name
        to_comfyui(lora_state_dict(transformer), float(cfg.lora_alpha or cfg.lora_rank), adapter_scales(transformer))
    except ValueError as e:
        raise TrainError(f"lora_target_modules: {e}; the ComfyUI export could not be written") from e
    optimizer = build_optimizer(params, cfg)
    room = _Room(out, params)
    room.check(room.checkpoint + room.export, "a checkpoint and the final LoRA export")  # now, not after hours
    ema = lora_ema.create(transformer, cfg)

    lr_scheduler = build_lr_scheduler(optimizer, cfg, total_steps)

    offloaded = cfg.enable_group_offload
    transformer, optimizer = accelerator.prepare(transformer, optimizer, device_placement=[not offloaded, True])
    model = accelerator.unwrap_model(transformer)

    state = LoopState(global_step=0, epoch=0, batch_in_epoch=0, loss_history=[], run=identity)
    resume = start.resume
    if resume is not None:
        state, lora, opt_state, sched_state = load_checkpoint(resume)
        try:
            set_peft_model_state_dict(model, lora)
            optimizer.load_state_dict(opt_state)
        except (RuntimeError, ValueError) as e:  # a checkpoint from before run identities were recorded
            raise CheckpointError(
                f"cannot resume {resume}: its LoRA or optimizer does not fit this config (lora_rank, lora_alpha, "
                "lora_target_modules or optimizer changed): set them back, or pick another output_dir"
            ) from e
        state.run = identity
        lr_scheduler.load_state_dict(sched_state)
        _apply_learning_rate(lr_scheduler, cfg.learning_rate, accelerator.print)
        if ema is not None:
            ema.load_checkpoint(resume, accelerator.print)
        accelerator.print(f"resumed from {resume} at step {state.global_step}")

    loss_log = LossLog(out / "logs" / "loss.jsonl", resume_from_step=state.global_step) if main else None
    stop = _StopFlag(accelerator.print)
    bar = TrainProgress(total_steps, state.global_step, enabled=main)
    image_embed_shape = (0, model.config.image_embed_dim)  # t2v: no image tokens
    schedule = schedule_options(cfg, dict(load_scheduler(paths).config) if cfg.shift == 0 else None)
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
                loss = training_step(
                    accelerator,
                    transformer,
                    optimizer,
                    params,
                    batch,
                    cfg,
                    epoch=state.epoch,
                    index=index,
                    rank=rank,
                    empty=empty,
                    image_embed_shape=image_embed_shape,
                    device=device,
                    schedule=schedule,
                )
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
                if ema is not None:
                    ema.update(state.global_step)
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
                bar.update(step_loss, lr, now - step_started)
                step_started = now
                stop_now = _agree(accelerator, bool(stop.requested))
                last = state.global_step >= total_steps
                limited = max_steps_this_run is not None and steps_this_run >= max_steps_this_run
                if main and (state.global_step % cfg.checkpointing_steps == 0 or stop_now or limited) and not last:
                    status.phase("checkpointing")
                    room.check(room.checkpoint, f"the checkpoint of step {state.global_step}")
                    room.write(
                        f"the checkpoint of step {state.global_step}",
                        _checkpoint,
                        out,
                        state,
                        model,
                        optimizer,
                        lr_scheduler,
                        cfg.checkpoints_total_limit,
                        ema,
                    )
                if _validation_due(cfg, state.global_step, total_steps, final=last) and main:
                    status.phase("validating")
                    for suffix, weights in lora_ema.validation_variants(cfg, ema):
                        with weights:
                            _validate(cfg, manifest, model, paths, state.global_step, device, suffix)
                if stop_now or limited:
                    stopped_early = not last
                    if stop_now:
                        accelerator.print(
                            f"{stop.requested or 'stop'}: checkpoint written at step {state.global_step}; "
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
        try:
            room.check(room.export, "the final LoRA export")
            lora_path = room.write("the final LoRA export", _export, cfg, model, out)
            if ema is not None:
                with ema.applied():
                    room.write("the EMA LoRA export", _export, cfg, model, out / lora_ema.EXPORT_DIR)
        except (TrainError, OSError, RuntimeError) as e:  # keep the steps since the last checkpoint
            raise TrainError(f"{e}. {_keep_last_step(out, state, model, optimizer, lr_scheduler, ema)}") from e
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


class _Room:
    """Free space for what the run writes: checked before each write so that a full disk is one line naming the disk
    and the space needed, never torch.save's "unexpected pos" traceback half way through a checkpoint."""

    FIX = "free space there (or point output_dir at a bigger disk) and run again with resume_from_checkpoint=latest"

    def __init__(self, out: Path, params):
        lora = sum(p.numel() * 4 for p in params)  # fp32 LoRA
        self.out = out
        self.checkpoint = 3 * lora + (4 << 20)  # LoRA + two optimizer moments + state, with a margin
        self.export = 2 * lora + (4 << 20)  # diffusers + ComfyUI files

    def check(self, need: int, what: str) -> None:
        problem = free_space_problem(self.out, need, what, self.FIX)
        if problem:
            raise TrainError(problem)

    def write(self, what: str, writer, *args):
        try:
            return writer(*args)
        except (OSError, RuntimeError) as e:
            if is_disk_full(e):
                raise TrainError(disk_full_message(self.out, what, self.FIX)) from e
            raise


def _keep_last_step(out, state, model, optimizer, lr_scheduler, ema) -> str:
    """After a failed final export: a checkpoint of the last step, so that a rerun exports without training again."""
    try:
        path = _checkpoint(out, state, model, optimizer, lr_scheduler, None, ema)
    except (OSError, RuntimeError) as e:
        return f"No checkpoint of step {state.global_step} could be written either ({e}); the last checkpoint is kept"
    return (
        f"Step {state.global_step} is kept in {path}: once the disk has room, run again with "
        "resume_from_checkpoint=latest (it exports without training)"
    )


def _checkpoint(out, state, model, optimizer, lr_scheduler, keep, ema=None) -> Path:
    extra = ema.checkpoint_files() if ema is not None else None
    lora, opt, sched = lora_state_dict(model), optimizer.state_dict(), lr_scheduler.state_dict()
    return save_checkpoint(out, state, lora, opt, sched, keep, extra)


def _validate(cfg, manifest, model, paths, step: int, device, suffix: str = "") -> list[Path]:
    from hvtune.data.media import write_video

    vae = load_vae(paths).to(device)
    if cfg.vae_enable_tiling:
        vae.enable_tiling()
    scheduler = load_scheduler(paths)
    image = None
    if manifest.task == "i2v":
        cond_latent, image_embeds = manifest.validation_image_condition()
        image = ImageCondition(cond_latent, image_embeds)
    jobs = [("0", manifest.validation_prompt_key, image)]
    if cfg.validation_using_datasets and manifest.task == "i2v":
        ids = [cfg.eval_dataset_id] if isinstance(cfg.eval_dataset_id, str) else cfg.eval_dataset_id
        jobs += dataset_validation_inputs(manifest, ids, cfg.num_eval_images)
    was_training = model.training
    model.eval()
    written = []
    for name, prompt_key, image in jobs:
        width, height = cfg.validation_size
        if image is not None:  # the cached condition fixes the size
            height = image.cond_latent.shape[-2] * vae.spatial_compression_ratio
            width = image.cond_latent.shape[-1] * vae.spatial_compression_ratio
        frames = sample_video(
            model,
            vae,
            scheduler,
            prompt=_text_condition(manifest, prompt_key),
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
        target = validation_dir(cfg.output_dir, step) / f"validation_{name}{suffix}.mp4"
        target.parent.mkdir(parents=True, exist_ok=True)
        write_video(target, frames, fps=cfg.validation_fps)
        written.append(target)
    model.train(was_training)
    return written


def _export(cfg, model, out: Path) -> Path:
    state_dict = lora_state_dict(model)
    meta = {
        "hvtune.flavour": cfg.model_flavour,
        "hvtune.rank": str(cfg.lora_rank),
        "hvtune.alpha": str(cfg.lora_alpha or cfg.lora_rank),
        **lycoris_metadata(cfg),
    }
    path = save_diffusers_lora(state_dict, out, meta, adapter_config(model))
    alpha = float(cfg.lora_alpha or cfg.lora_rank)
    save_comfyui_lora(state_dict, out / "comfyui_lora.safetensors", alpha, scales=adapter_scales(model))
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
    ema_path = lora_path.parent / "ema" / lora_path.name if lora_path else None  # use_ema's copy (hvtune.train.ema)
    record = resolved.to_record()
    return {
        "hvtune_run": 1,
        "config_hash": sha256_json(record["config"]),
        "resolved": record,
        "seeds": {"seed": resolved.train.seed, "validation_seed": resolved.train.validation_seed},
        "world_size": world,
        "global_step": state.global_step,
        "stopped_early": stopped_early,
        "run": state.run,
        "dataset_manifest_hash": manifest.samples_hash,
        "cache_fingerprint": manifest.fingerprint,
        "model": paths.record(),
        "determinism": determinism,
        "environment": environment(),
        "timings": {"total_s": round(time.time() - started, 2)},
        "outputs": {
            "lora": str(lora_path) if lora_path else None,
            "lora_sha256": lora_sha,
            "ema_lora": str(ema_path) if ema_path and ema_path.is_file() else None,
            "loss_log": "logs/loss.jsonl",
        },
    }
