"""Training progress for whoever watches it: the trackers (`report_to`: TensorBoard, wandb) and the progress line.
On a terminal: the tqdm bar. Without one (compose, `docker logs`, CI, a pipe): tqdm's carriage-return updates would
reach the log as one long line at the end, so instead one complete line is written at the first step, then every
HVTUNE_PROGRESS_SECONDS (default 30) and at the last step:

    train:  12% 120/1000 steps | loss 0.0831 | lr 1.00e-04 | 2.41 s/step | ETA 0:35:21 | peak mem 21.4/79.6 GiB

s/step is the mean over the steps since the previous line; memory is the accelerator's peak allocation (CUDA/ROCm),
or the process's peak resident size on the CPU.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

INTERVAL_ENV = "HVTUNE_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0
GIB = 1024**3


def _interval() -> float:
    text = os.environ.get(INTERVAL_ENV, "")
    try:
        return max(0.0, float(text)) if text else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def peak_memory() -> str:
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return f"peak mem {torch.cuda.max_memory_allocated() / GIB:.1f}/{total / GIB:.1f} GiB"
    import resource

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"peak mem {rss_kib / 1024**2:.1f} GiB RSS"


class TrainProgress:
    """`update()` once per optimiser step; `close()` when the loop ends."""

    def __init__(
        self,
        total: int,
        initial: int = 0,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.step, self.enabled = total, initial, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval = _interval() if interval is None else interval
        self.clock = clock
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=self.stream
            )
        self._last_time: float | None = None  # when the previous line was written (None: no line yet)
        self._window_steps, self._window_seconds = 0, 0.0

    def update(self, loss: float, lr: float, seconds: float) -> None:
        """One optimiser step done: its loss, learning rate and wall time."""
        self.step += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", s_step=f"{seconds:.2f}")
            self.bar.update(1)
            return
        self._window_steps += 1
        self._window_seconds += seconds
        now = self.clock()
        due = self._last_time is None or now - self._last_time >= self.interval or self.step >= self.total
        if due:
            self._write(loss, lr)
            self._last_time = now

    def _write(self, loss: float, lr: float) -> None:
        per_step = self._window_seconds / max(1, self._window_steps)
        self._window_steps, self._window_seconds = 0, 0.0
        percent = int(100 * self.step / self.total) if self.total else 100
        eta = format_duration(per_step * max(0, self.total - self.step))
        parts = [
            f"train: {percent:3d}% {self.step}/{self.total} steps",
            f"loss {loss:.4f}",
            f"lr {lr:.2e}",
            f"{per_step:.2f} s/step",
            f"ETA {eta}",
            peak_memory(),
        ]
        print(" | ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def trackers(cfg) -> list[str]:
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


def start_trackers(accelerator, cfg) -> None:
    """The run's config (secrets masked, scalars only) and name to the trackers `trackers(cfg)` named."""
    from hvtune.config.settings import mask_secrets

    scalars = {k: v for k, v in mask_secrets(cfg.model_dump()).items() if isinstance(v, int | float | str | bool)}
    run_name = {"wandb": {"name": cfg.tracker_run_name}} if cfg.tracker_run_name else {}
    accelerator.init_trackers(
        os.environ.get("WANDB_PROJECT", cfg.tracker_project_name), config=scalars, init_kwargs=run_name
    )
