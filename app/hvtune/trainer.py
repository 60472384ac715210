"""The training loop on accelerate: reads the cache, trains the LoRA, checkpoints, validates, exports, records.

`train` is set-up (`_set_up`: the run's folder, accelerate, the model with its LoRA, a resumed checkpoint), a loop of
`_step` (one micro-batch; an optimizer step when the gradients sync) and `_after_step` (log, checkpoint, validate,
stop), and `_finish` (export, loss plot, run record).

Every random draw is keyed on (seed, epoch, draw) in `objective`, and the global batch order in `batches.plan_epoch`
is the same for any number of processes; each process takes its slice of the global batch. So 1 process with
batch 2 and 2 processes with batch 1 see the same samples with the same noise, and resuming from a checkpoint
continues exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvtune.cache.manifest import load_manifest
from hvtune.config.rules import check_device_support
from hvtune.config.settings import ConfigError, ResolvedConfig
from hvtune.files import write_json_atomic
from hvtune.model.registry import detect_device, load_scheduler, load_transformer, resolve_model
from hvtune.output import preflight
from hvtune.output.checkpoints import (
    LoopState,
    RunStart,
    agree_on_start,
    clear_run_outputs,
    plan_start,
    restore_checkpoint,
    rolling_checkpoint_due,
    run_identity,
    save_checkpoint,
)
from hvtune.output.export import export_run_loras, lora_state_dict
from hvtune.output.progress import TrainProgress, start_trackers, trackers
from hvtune.output.record import LossLog, apply_determinism, plot_losses, run_record
from hvtune.output.run_dir import DiskRoom, check_output_dir
from hvtune.output.status import RunStatus
from hvtune.output.validation import render_validation, validation_due
from hvtune.run_files import RunFiles
from hvtune.train import ema as lora_ema
from hvtune.train import sharding
from hvtune.train.base_model import base_dtype, prepare_base
from hvtune.train.batches import load_batch, plan_epoch, text_entry
from hvtune.train.compile import compile_transformer
from hvtune.train.context_parallel import data_parallel_view, enable_context_parallel
from hvtune.train.objective import counter_seed, schedule_options
from hvtune.train.optim import build_lr_scheduler, build_optimizer
from hvtune.train.step import NonFiniteLoss, TrainError, step_loss, training_step
from hvtune.train.stop import StopFlag, agree

__all__ = ["NonFiniteLoss", "TrainError", "TrainResult", "train"]


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    stopped_early: bool
    lora_path: Path | None
    is_main_process: bool = True
    already_finished: bool = False  # the run in output_dir had finished: nothing was trained


@dataclass
class _Run:
    """Everything the loop works with, built once by `_set_up`."""

    resolved: ResolvedConfig
    cfg: Any  # resolved.train
    out: Path
    manifest: Any
    accelerator: Any
    main: bool  # the main process: the one that writes the run's files
    trackers: list[str]
    status: RunStatus
    paths: Any  # the resolved model files
    total_steps: int
    max_steps_this_run: int | None
    started: float
    determinism: dict
    transformer: Any  # as accelerate prepared it (DDP-wrapped with several processes)
    model: Any  # the unwrapped transformer with its LoRA
    params: list
    optimizer: Any
    lr_scheduler: Any
    room: DiskRoom
    ema: lora_ema.LoraEMA | None
    state: LoopState
    # the loop's own, from `_open_loop`
    loss_log: LossLog | None = None
    stop: StopFlag | None = None
    bar: TrainProgress | None = None
    step_inputs: dict = field(default_factory=dict)  # training_step's arguments that stay the same every step
    step_started: float = 0.0
    micro_losses: list = field(default_factory=list)  # of the optimizer step in progress
    micro_samples: list = field(default_factory=list)  # the ids of its samples: a NaN loss names them
    steps_this_run: int = 0
    stopped_early: bool = False
    kept: tuple[int, Path] | None = None  # (step, checkpoint) this run wrote last
    lora_path: Path | None = None  # the final LoRA, exported after the last step
    validation_notes: list[str] = field(default_factory=list)  # retried or skipped validation videos
    parallelism: sharding.Parallelism | None = None  # processes, sharding, context-parallel degree

    def close(self) -> None:
        self.stop.restore()
        self.bar.close()
        if self.loss_log is not None:
            self.loss_log.close()


def train(resolved: ResolvedConfig, *, max_steps_this_run: int | None = None) -> TrainResult:
    """Train the LoRA `resolved` describes; `max_steps_this_run` stops (with a checkpoint) after that many steps."""
    run = _set_up(resolved, max_steps_this_run)
    if isinstance(run, TrainResult):  # the run in output_dir had finished: nothing to train
        return run
    _open_loop(run)
    try:
        for index, items in _micro_batches(run):
            loss = _step(run, index, items)
            if loss is not None and _after_step(run, loss):
                break
    except RuntimeError as e:  # another process died inside a collective: one line, not a traceback
        sharding.raise_if_lost_process(e, run.accelerator, run.kept)
        raise
    finally:
        run.close()
    return _finish(run)


# ------------------------------------------------------------------------------------------------------------ set-up


def _set_up(resolved: ResolvedConfig, max_steps_this_run: int | None) -> _Run | TrainResult:
    """Checks, accelerate, the output folder taken over (or a finished run reported), the model with its LoRA, and
    the checkpoint to continue."""
    cfg = resolved.train
    problems = check_device_support(cfg, detect_device(), str(resolved.config_path or "config"))
    if problems:
        raise ConfigError(problems)
    out = Path(cfg.output_dir)
    check_output_dir(out)
    manifest = load_manifest(resolved)
    started = time.time()
    determinism = apply_determinism(cfg.deterministic)
    names = trackers(cfg)
    accelerator = data_parallel_view(sharding.build_accelerator(cfg, out, names), cfg)  # cp: the dp ranks
    total_steps = preflight.total_steps(cfg, manifest, accelerator.num_processes)
    identity = run_identity(cfg.model_dump(), manifest.samples_hash)
    start = plan_start(out, cfg.resume_from_checkpoint, identity, total_steps, overwrite=cfg.overwrite_output_dir)
    agree_on_start(start)
    if start.finished_at is not None:  # a restarted container, or the same command twice: keep the outputs
        lora, main = RunFiles(out).lora, accelerator.is_main_process
        return TrainResult(out, start.finished_at, False, lora if lora.is_file() else None, main, already_finished=True)
    _take_output_dir(accelerator, start, out)
    status = RunStatus(out, enabled=accelerator.is_main_process)  # status.json for the run page
    status.phase("starting")
    if names:
        start_trackers(accelerator, cfg)
    components = ["transformer", "scheduler"] + (["vae"] if validation_due(cfg, 0, 1, final=True) else [])
    paths = resolve_model(cfg, components)
    run = _Run(
        resolved, cfg, out, manifest, accelerator, accelerator.is_main_process, names, status, paths, total_steps,
        max_steps_this_run, started, determinism, **_trainable(cfg, paths, accelerator, out, total_steps),
        state=LoopState(global_step=0, epoch=0, batch_in_epoch=0, loss_history=[], run=identity),
    )  # fmt: skip
    enable_context_parallel(run.model, run.params, accelerator, run.manifest)
    if start.resume is not None:
        run.state = restore_checkpoint(
            start.resume, run.model, run.optimizer, run.lr_scheduler, run.ema, cfg.learning_rate, accelerator.print
        )
        run.state.run = identity
        accelerator.print(f"resumed from {start.resume} at step {run.state.global_step}")
    return run


def _take_output_dir(accelerator, start: RunStart, out: Path) -> None:
    if start.clear and accelerator.is_main_process:
        accelerator.print(f"overwrite_output_dir: removing the previous run's outputs in {out}")
        clear_run_outputs(start.clear)
    accelerator.wait_for_everyone()
    for notice in start.notices:
        accelerator.print(f"notice: {notice}")


def _trainable(cfg, paths, accelerator, out: Path, total_steps: int) -> dict[str, Any]:
    """The transformer with its LoRA, the optimizer, the lr schedule and the EMA, prepared by accelerate."""
    import torch

    transformer = load_transformer(paths, dtype=base_dtype(cfg))
    transformer.requires_grad_(False)
    prepare_base(transformer, cfg, accelerator.device)  # precision, checkpointing, offload: before LoRA (fp32)
    torch.manual_seed(counter_seed(cfg.seed, purpose="lora_init"))  # LoRA A init uses the global RNG
    preflight.add_lora_checked(transformer, cfg)  # targets without a layer or a ComfyUI name: now, not at the export
    compile_transformer(transformer, cfg, accelerator.print)  # dynamo_backend: after the LoRA, which it compiles in
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    room = DiskRoom(out, params)
    room.check(room.checkpoint + room.export, "a checkpoint and the final LoRA export")  # now, not after hours
    ema = lora_ema.create(transformer, cfg)
    lr_scheduler = build_lr_scheduler(optimizer, cfg, total_steps)
    offloaded = cfg.enable_group_offload
    transformer, optimizer = accelerator.prepare(transformer, optimizer, device_placement=[not offloaded, True])
    model = accelerator.unwrap_model(transformer)
    return dict(
        transformer=transformer, model=model, params=params, optimizer=optimizer, lr_scheduler=lr_scheduler,
        room=room, ema=ema,
    )  # fmt: skip


def _open_loop(run: _Run) -> None:
    """The loss log, the stop flag (SIGTERM, Ctrl-C), the progress bar and what every step passes to the objective."""
    cfg, step = run.cfg, run.state.global_step
    run.loss_log = LossLog(RunFiles(run.out).loss_log, step, run.accelerator.print) if run.main else None
    run.stop = StopFlag(run.accelerator.print)
    run.parallelism = sharding.parallelism(cfg, run.accelerator)
    if run.parallelism.world_size > 1:  # one process: nothing to say
        run.accelerator.print(f"training on {run.parallelism.describe()}")
    run.bar = TrainProgress(run.total_steps, step, enabled=run.main, parallelism=run.parallelism)
    accelerator = run.accelerator
    run.step_inputs = dict(
        accelerator=accelerator,
        transformer=run.transformer,
        optimizer=run.optimizer,
        params=run.params,
        cfg=cfg,
        rank=accelerator.process_index,
        image_embed_shape=(0, run.model.config.image_embed_dim),  # t2v: no image tokens
        schedule=schedule_options(cfg, dict(load_scheduler(run.paths).config) if cfg.shift == 0 else None),
        empty=text_entry(run.manifest, run.manifest.empty_prompt_key),
        device=accelerator.device,
    )
    run.step_started = time.time()
    run.status.start(run.resolved, run.total_steps, step, parallelism=run.parallelism.record())


# -------------------------------------------------------------------------------------------------------------- loop


def _micro_batches(run: _Run) -> Iterator[tuple[int, list]]:
    """(index in the epoch's plan, this process's slice of the global batch) from the loop position on, epoch after
    epoch until the last step; an epoch that runs out moves the position to the next one."""
    cfg, state = run.cfg, run.state
    rank, global_batch = run.accelerator.process_index, cfg.train_batch_size * run.accelerator.num_processes
    while state.global_step < run.total_steps:
        plan = plan_epoch(run.manifest, global_batch_size=global_batch, seed=cfg.seed, epoch=state.epoch)
        for index in range(state.batch_in_epoch, len(plan)):
            yield index, plan[index][rank * cfg.train_batch_size : (rank + 1) * cfg.train_batch_size]
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0


def _step(run: _Run, index: int, items: list) -> float | None:
    """One micro-batch; when its gradients synced, the optimizer step is counted and its loss returned."""
    accelerator, state = run.accelerator, run.state
    loss = training_step(batch=load_batch(run.manifest, items), epoch=state.epoch, index=index, **run.step_inputs)
    run.micro_losses.append(loss.detach())
    run.micro_samples += [run.manifest.samples[i].id for i, _draw in items]
    state.batch_in_epoch = index + 1
    if not accelerator.sync_gradients:
        return None
    run.lr_scheduler.step()
    verify = run.manifest.verify_command
    loss = step_loss(accelerator, run.micro_losses, state.global_step + 1, samples=run.micro_samples, verify=verify)
    run.micro_losses, run.micro_samples = [], []
    state.global_step += 1
    run.steps_this_run += 1
    if run.ema is not None:
        run.ema.update(state.global_step)
    state.loss_history.append(loss)
    return loss


def _after_step(run: _Run, loss: float) -> bool:
    """Log, checkpoint, export after the last step, validate; True when the loop ends here (the last step, a stop
    request, max_steps_this_run). The last step's checkpoint and LoRA come before its validation, never after."""
    cfg, step = run.cfg, run.state.global_step
    _log_step(run, loss)
    stop_now = agree(run.accelerator, bool(run.stop.requested))
    last = step >= run.total_steps
    limited = run.max_steps_this_run is not None and run.steps_this_run >= run.max_steps_this_run
    regular = step % cfg.checkpointing_steps == 0 or stop_now or limited or last
    rolling = not regular and rolling_checkpoint_due(cfg, step)
    if run.main and (regular or rolling):
        _keep_step(run, rolling)
    if run.main and last:
        run.lora_path = _export_all(run)
    if validation_due(cfg, step, run.total_steps, final=last) and (run.main or run.parallelism.sharding == "fsdp2"):
        _validate(run, step)
    if stop_now or limited:
        run.stopped_early = not last
        if stop_now:
            stop = run.stop.requested or "stop"
            run.accelerator.print(
                f"{stop}: checkpoint written at step {step}; resume with resume_from_checkpoint=latest"
            )
        return True
    return last


def _keep_step(run: _Run, rolling: bool = False) -> None:
    """The checkpoint of the current step, once (a validation's out-of-memory error asks for it too); a rolling one
    (`checkpointing_rolling_steps`) is pruned to `checkpoints_rolling_total_limit`, the others to
    `checkpoints_total_limit`."""
    step = run.state.global_step
    if run.kept is not None and run.kept[0] == step:
        return
    run.status.phase("checkpointing")
    run.room.check(run.room.checkpoint, f"the checkpoint of step {step}")
    keep = run.cfg.checkpoints_rolling_total_limit if rolling else run.cfg.checkpoints_total_limit
    path = run.room.write(f"the checkpoint of step {step}", _checkpoint, run, keep, rolling)
    run.kept = (step, path)


def _validate(run: _Run, step: int) -> None:
    """The validation videos (and the EMA's); an out-of-memory error keeps the step first (its checkpoint holds the
    LoRA), and each retried or skipped video is one line in the log and in status.json."""
    run.status.phase("validating")
    for suffix, weights in lora_ema.validation_variants(run.cfg, run.ema):
        with weights:
            args = (run.cfg, run.manifest, run.model, run.paths, step, run.accelerator.device, suffix)
            keep = (lambda: _keep_step(run)) if run.main else (lambda: None)  # FSDP2: every process samples
            notes = render_validation(*args, on_out_of_memory=keep, write=run.main).notes
        for note in notes:
            run.accelerator.print(note)
            run.validation_notes.append(note)
            run.status.phase("validating", validation_notes=run.validation_notes[-20:])


def _log_step(run: _Run, loss: float) -> None:
    """The step's loss and learning rate to the loss log, the trackers, status.json and the progress bar."""
    step, now = run.state.global_step, time.time()
    lr, seconds = run.lr_scheduler.get_last_lr()[0], now - run.step_started
    if run.main:
        run.loss_log.write(step=step, loss=loss, lr=lr, epoch=run.state.epoch, seconds=round(seconds, 4))
    if run.trackers:
        run.accelerator.log({"train/loss": loss, "train/lr": lr}, step=step)
    run.status.step(step, loss=loss, lr=lr, seconds=seconds)
    run.bar.update(loss, lr, seconds)
    run.step_started = now


def _checkpoint(run: _Run, keep: int | None, rolling: bool = False) -> Path:
    extra = run.ema.checkpoint_files() if run.ema is not None else None
    lora, opt, sched = lora_state_dict(run.model), run.optimizer.state_dict(), run.lr_scheduler.state_dict()
    return save_checkpoint(run.out, run.state, lora, opt, sched, keep, extra, rolling)


# ------------------------------------------------------------------------------------------------------------ finish


def _finish(run: _Run) -> TrainResult:
    """The LoRA files (and the EMA's), the loss plot and run.json, unless the run stopped early; status.json."""
    cfg, files, step = run.cfg, RunFiles(run.out), run.state.global_step
    run.accelerator.wait_for_everyone()
    lora_path = run.lora_path  # exported after the last step; resumed at the last step, it is exported here
    if run.main and not run.stopped_early:
        lora_path = lora_path or _export_all(run)
        losses = [(i + 1, v) for i, v in enumerate(run.state.loss_history)]
        plot_losses(files.loss_plot, {"train": losses}, f"{cfg.model_flavour} LoRA rank {cfg.lora_rank}")
    if run.main:
        record = run_record(
            run.resolved, run.manifest, run.paths, state=run.state, parallelism=run.parallelism.record(),
            determinism=run.determinism, started=run.started, stopped_early=run.stopped_early, lora_path=lora_path,
        )  # fmt: skip
        write_json_atomic(files.record, record)
    reason = f"stop requested: checkpoint at step {step}" if run.stop.requested else None
    run.status.finish(stopped_early=run.stopped_early, reason=reason, step=step)
    run.accelerator.end_training()
    return TrainResult(run.out, step, run.stopped_early, lora_path, run.main)


def _export_all(run: _Run) -> Path:
    """The final LoRA and the EMA's; when that fails (a full disk), a checkpoint of the last step is kept."""
    try:
        return export_run_loras(run.room, run.cfg, run.model, run.ema, run.out)
    except (TrainError, OSError, RuntimeError) as e:  # keep the steps since the last checkpoint
        raise TrainError(f"{e}. {_keep_last_step(run)}") from e


def _keep_last_step(run: _Run) -> str:
    """After a failed final export: the checkpoint of the last step (written before the export), so that a rerun
    exports without training again."""
    step = run.state.global_step
    try:
        _keep_step(run)
    except (TrainError, OSError, RuntimeError) as e:
        return f"No checkpoint of step {step} could be written either ({e}); the last checkpoint is kept"
    return (
        f"Step {step} is kept in {run.kept[1]}: once the disk has room, run again with "
        "resume_from_checkpoint=latest (it exports without training)"
    )
