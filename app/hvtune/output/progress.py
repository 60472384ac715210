"""Training progress for whoever watches it: the trackers (`report_to`: TensorBoard, wandb) and the progress line.
On a terminal: the tqdm bar. Without one (compose, `docker logs`, CI, a pipe): tqdm's carriage-return updates would
reach the log as one long line at the end, so instead one complete line is written at the first step, then every
HVTUNE_PROGRESS_SECONDS (default 30) and at the last step:

    train:  12% 120/1000 steps | loss 0.0831 | lr 1.00e-04 | 2.41 s/step | ETA 0:35:21 | peak mem 21.4/79.6 GiB

(with several processes, the line ends with how the run is spread: `| 8 processes, fsdp2`; the peak memory is the
main process's)

s/step is the mean over the steps since the previous line; memory is the accelerator's peak allocation (CUDA/ROCm),
or the process's peak resident size on the CPU. The terminal-or-lines choice and the line's count, rate and ETA are
the ones every phase shows (progress_lines.py: the scan and the cache phases too).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TextIO

from hvtune.progress_lines import ProgressLines

GIB = 1024**3


def peak_memory() -> str:
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return f"peak mem {torch.cuda.max_memory_allocated() / GIB:.1f}/{total / GIB:.1f} GiB"
    import resource

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"peak mem {rss_kib / 1024**2:.1f} GiB RSS"


class TrainProgress(ProgressLines):
    """`update()` once per optimiser step; `close()` when the loop ends. s/step is the steps' own time (the loop
    measures it), and a line is also written at the last step; a run stopped early writes no extra line."""

    def __init__(
        self,
        total: int,
        initial: int = 0,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        parallelism=None,
    ):
        super().__init__(
            total, label="train", unit="step", initial=initial, enabled=enabled, stream=stream, interval=interval,
            clock=clock,
        )  # fmt: skip
        self._loss, self._lr = 0.0, 0.0
        # several processes or context parallel: each line says how the run is spread ("2 processes, fsdp2")
        spread = parallelism is not None and (parallelism.world_size > 1 or parallelism.context_parallel_size > 1)
        self._spread = parallelism.describe() if spread else None

    def update(self, loss: float, lr: float, seconds: float) -> None:
        """One optimiser step done: its loss, learning rate and wall time."""
        self._loss, self._lr = loss, lr
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", s_step=f"{seconds:.2f}")
        self.advance(1, seconds=seconds)

    def _due(self, now: float) -> bool:
        return super()._due(now) or self.done >= self.total

    def line_parts(self, rate: str, tail: str) -> list[str]:
        parts = [f"loss {self._loss:.4f}", f"lr {self._lr:.2e}", rate, tail, peak_memory()]
        return parts + ([self._spread] if self._spread else [])

    def close(self, *, final_line: bool = False) -> None:
        super().close(final_line=final_line)


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
