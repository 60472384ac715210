"""The run's output folder as a place to write: writable before anything starts, and with room for each write.

A full disk is one line naming the disk and the space needed, checked before each write, never torch.save's
"unexpected pos" traceback half way through a checkpoint.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hvtune.files import disk_full_message, free_space_problem, is_disk_full, writable_dir_problem
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
