"""The run's output folder as a place to write: writable before anything starts, and with room for each write.

A full disk is one line naming the disk and the space needed, checked before each write, never torch.save's
"unexpected pos" traceback half way through a checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from hvtune.files import disk_full_message, free_space_problem, is_disk_full, writable_dir_problem
from hvtune.locks import exclusive_lock, lock_holder
from hvtune.run_files import RunFiles
from hvtune.train.step import TrainError


def check_output_dir(path: Path) -> None:
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


def output_dir_lock(path: Path) -> AbstractContextManager:
    """One `hvtune train` per output folder: held by the main process (rank 0, or no launcher) from before anything
    is written (status.json included) until it exits; a second one is refused naming the first."""
    if os.environ.get("RANK", "0") != "0":  # the launcher's other processes write nothing of their own
        return nullcontext()
    check_output_dir(path)
    return exclusive_lock(RunFiles(path).train_lock, "hvtune train", lambda holder: _in_use(path, holder))


def output_dir_in_use(path: Path) -> str | None:
    """The refusal `output_dir_lock` would make now (another `hvtune train` holds the folder), or None."""
    holder = lock_holder(RunFiles(path).train_lock)
    return _in_use(path, holder) if holder else None


def _in_use(path: Path, holder: str) -> str:
    return (
        f"output_dir {path} is in use by another `hvtune train`: {holder}. Wait for it to finish (or stop it), "
        "or train into another output_dir"
    )


class DiskRoom:
    """Free space for what the run writes: `check` before a write, `write` turns a full disk during one into the
    same one line."""

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
