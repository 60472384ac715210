"""`status.json`: what a run is doing now, for the run page (`hvtune serve`) and for scripts (`cat status.json`).

The trainer owns one `RunStatus` on the main process and calls it at a few points of the loop: `phase` when the run
starts, validates or checkpoints, `step` after every optimizer step, `finish` at the end. Each write replaces the
whole file atomically (files.py), so a reader never sees half a file. During training the file is rewritten at most
once a second (and at every change of phase): the page polls it, and a write per step would cost the loop fsyncs
for nothing.

A run that dies without a word (SIGKILL, the OOM killer, a lost machine) leaves its last state behind; readers tell
from `pid`, `host` and `updated` that nobody is updating it any more (`is_stale`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hvtune.errors import UserError
from hvtune.files import write_json_atomic
from hvtune.output.record import environment
from hvtune.run_files import RunFiles

STATES = ("caching", "cached", "starting", "training", "validating", "checkpointing", "stopped", "finished", "failed")
ENDED = ("cached", "stopped", "finished", "failed")  # nobody updates the file in these
WRITE_EVERY_S = 1.0
RECENT_STEPS = 20  # s/step is the median of the last this many steps: validation and checkpoints don't skew it


def status_path(output_dir: str | os.PathLike[str]) -> Path:
    return RunFiles(output_dir).status


def one_line(error: BaseException) -> str:
    """An exception as the one line the page shows: the user-facing message for UserError, else `Type: message`."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    text, used = (lines[0].strip(), 1) if lines else ("", 0)
    if text.endswith(":") and len(lines) > 1:  # a heading such as "2 configuration problem(s):": add the first
        text, used = f"{text} {lines[1].strip().lstrip('-* ')}", 2
    if len(lines) > used:
        text += f" (+{len(lines) - used} more lines in the log)"
    if isinstance(error, UserError):
        return text or type(error).__name__
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class RunStatus:
    """Writes `status.json` for one run. `enabled=False` (processes other than the main one) makes every call a
    no-op, so the trainer calls it unconditionally."""

    def __init__(self, output_dir: str | os.PathLike[str], *, enabled: bool = True, clock=time.time):
        self.path = status_path(output_dir)
        self.enabled = enabled
        self._clock = clock
        self._recent: deque[float] = deque(maxlen=RECENT_STEPS)
        self._last_write = 0.0
        self.data: dict[str, Any] = {
            "hvtune_status": 1,
            "state": "starting",
            "reason": None,
            "step": 0,
            "total_steps": None,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": self._clock(),
            "updated": None,
        }

    def start(self, resolved, total_steps: int, step: int = 0, parallelism: dict | None = None) -> None:
        """Training begins: the run record's inputs (config with sources, seeds, versions, the processes and their
        sharding) go into the file once, so the page shows them while `run.json` (written at the end) does not
        exist yet."""
        record = resolved.to_record()
        if parallelism is not None:
            record["parallelism"] = parallelism
            record["world_size"] = parallelism["world_size"]
        record["seeds"] = {"seed": resolved.train.seed, "validation_seed": resolved.train.validation_seed}
        record["environment"] = environment()
        self.phase("training", step=step, total_steps=total_steps, record=record)

    def phase(self, state: str, **fields: Any) -> None:
        """A change of phase, written at once (training, validating, checkpointing, ...)."""
        assert state in STATES, state
        self.data.update(fields, state=state)
        self._write()

    def step(self, step: int, *, loss: float, lr: float, seconds: float) -> None:
        """After each optimizer step; written when a second has passed since the last write or the phase changed."""
        self._recent.append(seconds)
        self.data.update(step=step, loss=loss, lr=lr)
        if self.data["state"] != "training" or self._clock() - self._last_write >= WRITE_EVERY_S:
            self.data["state"] = "training"
            self._write()

    def finish(self, *, stopped_early: bool, reason: str | None = None, **fields: Any) -> None:
        self.data.update(fields, reason=reason)
        self.phase("stopped" if stopped_early else "finished")

    def fail(self, error: BaseException) -> None:
        self.data["reason"] = one_line(error)
        self.phase("stopped" if isinstance(error, KeyboardInterrupt) else "failed")

    def _write(self) -> None:
        if not self.enabled:
            return
        now = self._clock()
        self._last_write = now
        self.data["updated"] = now
        if self._recent:
            per_step = statistics.median(self._recent)
            self.data["s_per_step"] = round(per_step, 4)
            total = self.data.get("total_steps")
            if total and self.data["state"] not in ENDED:
                self.data["eta_s"] = round(per_step * max(0, total - self.data["step"]), 1)
            else:
                self.data["eta_s"] = None
        self.data["gpu_memory"] = _gpu_memory()
        # a full disk must not stop training over a progress file; the loss log and checkpoints tell
        with contextlib.suppress(OSError):
            write_json_atomic(self.path, self.data, durable=False, indent=None)  # no fsync: see files.atomic_path


def _gpu_memory() -> dict[str, float] | None:
    """torch's own counters (host-side, no device sync), in GiB; None without a GPU or before torch is imported."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    gib = 2**30
    return {
        "allocated_gb": round(torch.cuda.memory_allocated() / gib, 2),
        "reserved_gb": round(torch.cuda.memory_reserved() / gib, 2),
        "peak_gb": round(torch.cuda.max_memory_allocated() / gib, 2),
        "total_gb": round(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / gib, 2),
    }


@contextmanager
def recorded(output_dir: str | os.PathLike[str], state: str | None = None, done: str | None = None) -> Iterator[None]:
    """Around a command (`hvtune cache`, `hvtune train`): an error that escapes it is written to `status.json` as
    `failed` with its one-line reason, then raised as before. `state` (e.g. "caching") is written first and `done`
    (e.g. "cached") on success. Only the main process writes (rank 0, or no launcher at all); nothing here may hide
    the original error."""
    main = os.environ.get("RANK", "0") == "0"
    # written only into an output folder that exists: caching must not create one as a side effect
    status = RunStatus(output_dir, enabled=main and Path(output_dir).is_dir())
    if state is not None:
        status.phase(state)
    try:
        yield
    except BaseException as error:
        if isinstance(error, SystemExit) and not error.code:
            raise
        previous = read_status(output_dir)
        if previous and previous.get("pid") == os.getpid():
            # keep what the run had reported (step, loss, ...) and add the failure
            status.data.update({k: v for k, v in previous.items() if k not in ("state", "reason")})
        status.enabled = main and Path(output_dir).is_dir()
        status.fail(error)
        raise
    if done is not None:
        status.phase(done)


def read_status(output_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The status a run last wrote, or None when there is none (or it cannot be read: a reader never fails on it)."""
    try:
        data = json.loads(status_path(output_dir).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def is_stale(status: dict[str, Any], *, now: float | None = None) -> str | None:
    """Why a status that says the run is working cannot be true any more, or None when it may be. On the same host
    (the page runs in the training container) a dead pid is certain; elsewhere, no update for a long time is a
    strong hint (a validation may legitimately take minutes, so the wait grows with the step time)."""
    if status.get("state") in ENDED:
        return None
    pid, host = status.get("pid"), status.get("host")
    if isinstance(pid, int) and host == socket.gethostname() and not process_alive(pid):
        return f"the process (pid {pid}) ended without reporting: killed (out of memory? docker kill?); see its log"
    updated = status.get("updated")
    if isinstance(updated, int | float):
        quiet = (now or time.time()) - updated
        allowed = max(600.0, 50 * float(status.get("s_per_step") or 0))
        if quiet > allowed:
            return f"no update for {quiet / 60:.0f} min: the run may have died; check its log"
    return None
