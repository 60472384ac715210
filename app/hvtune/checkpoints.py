"""Training checkpoints: LoRA weights, optimizer, lr schedule and loop position, written atomically.

A checkpoint is a directory `checkpoint-NNNNNN` that appears only when complete: it is written as a hidden temp
directory and renamed, so a run killed mid-write leaves a temp directory that resume ignores (and the next save
removes). Only the trainable LoRA parameters are saved, not the 8.3B frozen base.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import UserError
from .files import atomic_directory

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


class CheckpointError(UserError):
    pass


@dataclass
class LoopState:
    global_step: int  # optimizer steps done
    epoch: int  # epoch to continue in
    batch_in_epoch: int  # next global batch index within that epoch
    loss_history: list[float]


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def save_checkpoint(
    output_dir: str | Path, state: LoopState, lora: dict, optimizer: dict, scheduler: dict, keep: int | None
) -> Path:
    import torch
    from safetensors.torch import save

    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{PREFIX}*"):  # debris of a killed save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{PREFIX}{state.global_step:06d}"
    with atomic_directory(final) as tmp:  # its temp name starts with f".{PREFIX}": the glob above removes it
        # bytes through open(), not save_file: safetensors creates its files 0600, unreadable to other users
        (tmp / "lora.safetensors").write_bytes(save({k: v.detach().cpu().contiguous() for k, v in lora.items()}))
        torch.save({"optimizer": optimizer, "scheduler": scheduler}, tmp / "optimizer.pt")
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state)))  # written last: its presence marks completeness
    if keep is not None:
        for old in list_checkpoints(output_dir)[:-keep]:
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
