"""Training checkpoints: LoRA weights, optimizer, lr schedule and loop position, written atomically.

A checkpoint is a directory `checkpoint-NNNNNN` that appears only when complete: it is written as a hidden temp
directory and renamed, so a run killed mid-write leaves a temp directory that resume ignores (and the next save
removes). Only the trainable LoRA parameters are saved, not the 8.3B frozen base.

A run owns its `output_dir`. Every checkpoint (and `run.json`) records the run's identity (`run_identity`): the
settings a checkpoint cannot be continued without (the LoRA's shape and scale, the flavour, the optimizer) and the
ones a resumed run may change but must announce (seed, batch, data, base model path). `plan_start` decides, before
any model is loaded, what a `train` in a folder does: start fresh (empty folder, or `overwrite_output_dir`), continue
the newest checkpoint (a compatible one), report a finished run as finished (a restarted container), or refuse with
one line naming the ways out - it never mixes two runs in one folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hvtune.errors import UserError
from hvtune.files import atomic_directory
from hvtune.run_files import RunFiles

PREFIX = "checkpoint-"
ROLLING = "-rolling"  # SimpleTuner's second series (checkpointing_rolling_steps): checkpoint-NNNNNN-rolling
STATE_FILE = "trainer_state.json"


class CheckpointError(UserError):
    pass


@dataclass
class LoopState:
    global_step: int  # optimizer steps done
    epoch: int  # epoch to continue in
    batch_in_epoch: int  # next global batch index within that epoch
    loss_history: list[float]
    run: dict[str, Any] | None = None  # run_identity of the run that wrote it (None: written before it was recorded)


def checkpoint_root(output_dir: str | Path) -> Path:
    return RunFiles(output_dir).checkpoints


def list_checkpoints(output_dir: str | Path, rolling: bool | None = None) -> list[Path]:
    """Complete checkpoints, oldest first: both series, or only the rolling (True) or the regular (False) ones."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    if rolling is not None:
        found = [p for p in found if p.name.endswith(ROLLING) == rolling]
    return sorted(found, key=_step)


def rolling_checkpoint_due(cfg, step: int) -> bool:
    """SimpleTuner's rolling series: every checkpointing_rolling_steps, when no regular checkpoint is written."""
    return cfg.checkpointing_rolling_steps > 0 and step % cfg.checkpointing_rolling_steps == 0


def save_checkpoint(
    output_dir: str | Path,
    state: LoopState,
    lora: dict,
    optimizer: dict,
    scheduler: dict,
    keep: int | None,
    extra_files: dict[str, bytes] | None = None,
    rolling: bool = False,
) -> Path:
    """`extra_files`: {name: bytes} written into the checkpoint too (the EMA's `ema.safetensors`). `keep`: the newest
    checkpoints of the same series kept (regular: checkpoints_total_limit, rolling: checkpoints_rolling_total_limit;
    SimpleTuner's checkpoint_state_cleanup prunes each series apart)."""
    import torch
    from safetensors.torch import save

    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{PREFIX}*"):  # debris of a killed save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{PREFIX}{state.global_step:06d}{ROLLING if rolling else ''}"
    with atomic_directory(final) as tmp:  # its temp name starts with f".{PREFIX}": the glob above removes it
        # bytes through open(), not save_file: safetensors creates its files 0600, unreadable to other users
        (tmp / "lora.safetensors").write_bytes(save({k: v.detach().cpu().contiguous() for k, v in lora.items()}))
        torch.save({"optimizer": optimizer, "scheduler": scheduler}, tmp / "optimizer.pt")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state)))  # written last: its presence marks completeness
    if keep is not None:
        for old in list_checkpoints(output_dir, rolling)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """`latest` -> newest complete checkpoint (None if there is none); a path -> that checkpoint, which must exist."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_absolute() and not path.exists():  # SimpleTuner's form: a checkpoint name inside output_dir
        path = checkpoint_root(output_dir) / path.name
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"resume_from_checkpoint: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def load_checkpoint(path: Path) -> tuple[LoopState, dict, dict, dict]:
    import torch
    from safetensors.torch import load_file

    state = LoopState(**json.loads((path / STATE_FILE).read_text()))
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    return state, load_file(path / "lora.safetensors"), opt["optimizer"], opt["scheduler"]


def restore_checkpoint(path: Path, model, optimizer, lr_scheduler, ema, learning_rate: float, log) -> LoopState:
    """Put checkpoint `path` into the run: the LoRA weights into `model`, the optimizer's and the lr schedule's state
    (a changed `learning_rate` wins, announced through `log`), the EMA's average; returns the loop position."""
    from peft.utils import set_peft_model_state_dict

    from hvtune.train.optim import apply_learning_rate

    state, lora, opt_state, sched_state = load_checkpoint(path)
    try:
        set_peft_model_state_dict(model, lora)
        optimizer.load_state_dict(opt_state)
    except (RuntimeError, ValueError) as e:  # a checkpoint from before run identities were recorded
        raise CheckpointError(
            f"cannot resume {path}: its LoRA or optimizer does not fit this config (lora_rank, lora_alpha, "
            "lora_target_modules or optimizer changed): set them back, or pick another output_dir"
        ) from e
    lr_scheduler.load_state_dict(sched_state)
    apply_learning_rate(lr_scheduler, learning_rate, log)
    if ema is not None:
        ema.load_checkpoint(path, log)
    return state


# ------------------------------------------------------------------------------------------------------ run ownership

# a checkpoint cannot be continued when one of these changed: the LoRA's tensors, scale or optimizer state differ
MUST_MATCH = ("model_flavour", "lora_type", "lora_rank", "lora_alpha", "lora_target_modules", "optimizer")
# a resumed run may change these; each change is announced (the learning rate is announced by the trainer)
ANNOUNCED = (
    "seed",
    "use_ema",
    "train_batch_size",
    "gradient_accumulation_steps",
    "lora_dropout",
    "pretrained_model_name_or_path",
    "dataset",
)


def run_identity(config: dict[str, Any], dataset_hash: str | None) -> dict[str, Any]:
    """The settings that decide whether a checkpoint can be continued, from a config dump (`model_dump`)."""
    identity = {k: config.get(k) for k in MUST_MATCH + ANNOUNCED if k != "dataset"}
    if identity["lora_alpha"] is None:  # unset alpha means alpha = rank
        identity["lora_alpha"] = identity["lora_rank"]
    identity["dataset"] = dataset_hash
    return identity


def identity_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(blocking, announced) changes as "key: old -> new"; nothing when `saved` is unknown (an older checkpoint)."""
    if not saved:
        return [], []
    blocking, announced = [], []
    for key in MUST_MATCH + ANNOUNCED:
        old, new = saved.get(key), current.get(key)
        if key == "lora_target_modules":  # null meant main_blocks until the default became SimpleTuner's (issue 27)
            old, new = old or "main_blocks", new or "main_blocks"
        if old != new:
            text = "the data (cache manifest) changed" if key == "dataset" else f"{key} {old!r} -> {new!r}"
            (blocking if key in MUST_MATCH else announced).append(text)
    return blocking, announced


@dataclass
class RunStart:
    """What `train` does in its output_dir."""

    resume: Path | None = None  # the checkpoint to continue
    finished_at: int | None = None  # the run in the folder already finished at this step: nothing to do
    notices: list[str] = field(default_factory=list)
    clear: list[Path] = field(default_factory=list)  # outputs of a replaced run (overwrite_output_dir)


def agree_on_start(start: RunStart) -> None:
    """Every process continues from the same point. On several machines each reads its own output_dir: a machine
    without machine 0's checkpoints would start at step 0 while the others resume, and the run would mix them."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    mine = (start.resume.name if start.resume else None, start.finished_at)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if len(set(everyone)) == 1:
        return
    said = ", ".join(
        f"process {rank}: " + (f"finished at step {end}" if end is not None else resume or "a fresh start")
        for rank, (resume, end) in enumerate(everyone)
    )
    raise UserError(
        f"the processes would not continue from the same point ({said}): each machine reads its own output_dir; "
        "copy machine 0's output_dir/checkpoints to every machine (docs/CONTAINERS.md#several-boxes), or train into "
        "a new output_dir on all of them"
    )


def _previous_record(output_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(RunFiles(output_dir).record.read_text())
        return record if isinstance(record, dict) and "global_step" in record else None
    except (OSError, ValueError):
        return None


def _ways_out(output_dir: Path) -> str:
    return f"pick another output_dir, or set overwrite_output_dir=true to replace the run in {output_dir}"


def plan_start(
    output_dir: Path, resume: str | None, identity: dict[str, Any], total_steps: int, *, overwrite: bool
) -> RunStart:
    """Decide what a `train` with `resume` (resume_from_checkpoint) does in `output_dir`; raise CheckpointError with
    one line when it would mix two runs, continue an incompatible checkpoint, or go back in steps."""
    output_dir = Path(output_dir)
    if overwrite:
        # what hvtune itself writes into an output_dir: removed by overwrite_output_dir, nothing else is
        return RunStart(clear=[path for path in RunFiles(output_dir).owned() if path.exists()])
    if resume and resume != "latest":  # an explicit checkpoint, possibly another folder's: the user chose it
        path = find_checkpoint(output_dir, resume)
        return RunStart(resume=path, notices=check_resumable(path, identity, total_steps))
    checkpoints = list_checkpoints(output_dir)
    record = _previous_record(output_dir)
    if record is not None and not record.get("stopped_early"):
        config = (record.get("resolved") or {}).get("config") or {}  # a run.json from before identities
        saved = record.get("run") or run_identity(config, record.get("dataset_manifest_hash"))
        blocking, announced = identity_changes(saved, identity)
        step = int(record["global_step"])
        if not blocking and not announced and total_steps == step:
            return RunStart(finished_at=step)
        changed = blocking + announced if blocking or total_steps < step else []
        if total_steps < step:
            changed.append(f"max_train_steps {step} -> {total_steps}")
        if changed:  # a new run, not the continuation of this one
            raise CheckpointError(
                f"output_dir {output_dir} holds another run, finished at step {step} ({'; '.join(changed)}): "
                + _ways_out(output_dir)
            )
    if not checkpoints and record is None:
        return RunStart()
    held = f"checkpoints up to step {_step(checkpoints[-1])}" if checkpoints else "a finished run's outputs"
    if resume != "latest":
        raise CheckpointError(
            f"output_dir {output_dir} holds another run ({held}): continue it with resume_from_checkpoint=latest, "
            + _ways_out(output_dir)
        )
    if not checkpoints:
        raise CheckpointError(
            f"output_dir {output_dir} holds a finished run at step {record['global_step']} without a checkpoint to "
            f"continue from (max_train_steps is now {total_steps}): {_ways_out(output_dir)}"
        )
    return RunStart(resume=checkpoints[-1], notices=check_resumable(checkpoints[-1], identity, total_steps))


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name[len(PREFIX) :].removesuffix(ROLLING))


def check_resumable(checkpoint: Path, identity: dict[str, Any], total_steps: int) -> list[str]:
    """Announcements for continuing `checkpoint` under `identity`; CheckpointError when it cannot be continued."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{checkpoint / STATE_FILE} is unreadable ({e}): resume from another checkpoint") from e
    blocking, announced = identity_changes(state.get("run"), identity)
    if blocking:
        raise CheckpointError(
            f"cannot resume {checkpoint}: {'; '.join(blocking)}. Set them back to resume, or start a new run: "
            + _ways_out(checkpoint.parent.parent)
        )
    if state["global_step"] > total_steps:
        raise CheckpointError(
            f"cannot resume {checkpoint}: it is at step {state['global_step']}, past max_train_steps={total_steps}: "
            f"raise max_train_steps, or {_ways_out(checkpoint.parent.parent)}"
        )
    return [f"changed at resume: {change}" for change in announced]


def clear_run_outputs(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
