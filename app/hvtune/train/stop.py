"""Stopping a run between steps: SIGTERM (docker stop) and Ctrl-C become a request the loop honours at the next
optimizer step, with a checkpoint, on every process at once."""

from __future__ import annotations

import signal


class StopFlag:
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


def agree(accelerator, flag: bool) -> bool:
    """All processes stop together: any one that got SIGTERM stops them all."""
    import torch

    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)
