"""Progress for whoever watches a long phase - the dataset scan, each cache phase, training - on a terminal or in a log.

On a terminal: a tqdm bar. Without one (compose, `docker logs`, CI, a pipe) tqdm's carriage-return updates would reach
the log as one long line at the end, so instead complete lines are written: one when the first unit is done, then one
every HVTUNE_PROGRESS_SECONDS (default 30) while the count moves, and a last one when the phase ends:

    vae:  40% 80/200 clips | 1.23 s/clip | ETA 0:02:27
    vae: 100% 200/200 clips | 1.20 s/clip | done in 0:04:00

s/unit is the wall time per unit since the previous line (the last line: over the whole phase); the ETA is that rate
times what is left. The count may be a total of several processes (`update_to`: a sharded cache build's main process
counts every process's entries). Training's line (output/progress.py) is this one with its loss, learning rate and
memory, and its own end rule.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

INTERVAL_ENV = "HVTUNE_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0
T = TypeVar("T")


def interval_seconds() -> float:
    """HVTUNE_PROGRESS_SECONDS, or 30 when unset or not a number."""
    text = os.environ.get(INTERVAL_ENV, "")
    try:
        return max(0.0, float(text)) if text else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressLines:
    """`advance(n)` (or `update_to(done)`) as units finish; `close()` when the phase ends. `enabled` False: silent
    (another process shows the progress, or the caller asked for none)."""

    def __init__(
        self,
        total: int,
        *,
        label: str,
        unit: str,
        initial: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.done, self.label, self.unit, self.enabled = total, initial, label, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval_seconds() if interval is None else interval
        self.clock = clock
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=label, unit=unit, dynamic_ncols=True, file=self.stream)
        self._started = self._tick = clock()
        self._initial = initial
        self._last_line: tuple[float, int] | None = None  # (when, count) of the previous line; None: no line yet
        self._window_units, self._window_seconds = 0, 0.0

    @property
    def lines(self) -> bool:
        """Complete lines (no terminal), not a bar."""
        return self.enabled and self.bar is None

    def each(self, items: Iterable[T]) -> Iterator[T]:
        """The items, counting each one done when the caller asks for the next; closes at the end (as tqdm)."""
        for item in items:
            yield item
            self.advance()
        self.close()

    def advance(self, n: int = 1, *, seconds: float | None = None) -> None:
        """`n` more units done; `seconds`: their own time (else the wall time since the previous update)."""
        self.update_to(self.done + n, seconds=seconds)

    def update_to(self, done: int, *, seconds: float | None = None) -> None:
        """The count is now `done` (a total across processes may arrive this way)."""
        now = self.clock()
        self._window_units += done - self.done
        self._window_seconds += seconds if seconds is not None else now - self._tick
        self._tick, self.done = now, done
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        elif self._due(now):
            self.write_line()

    def _due(self, now: float) -> bool:
        if self._last_line is None:
            return self.done > self._initial
        when, count = self._last_line
        return now - when >= self.interval and self.done != count

    def write_line(self, *, final: bool = False) -> None:
        """One complete line (see the module docstring); the window's rate starts again."""
        if final:
            elapsed = self.clock() - self._started
            per = elapsed / (self.done - self._initial) if self.done > self._initial else None
            tail = f"done in {format_duration(elapsed)}"
        else:
            per = self._per_unit()
            tail = f"ETA {format_duration(per * max(0, self.total - self.done))}" if per is not None else "ETA unknown"
        rate = f"{per:.2f} s/{self.unit}" if per is not None else f"- s/{self.unit}"
        print(" | ".join([self.count_text(), *self.line_parts(rate, tail)]), file=self.stream, flush=True)
        self._last_line = (self.clock(), self.done)
        self._window_units, self._window_seconds = 0, 0.0

    def _per_unit(self) -> float | None:
        if self._window_units > 0:
            return self._window_seconds / self._window_units
        if self.done > self._initial:  # nothing new in this window: the whole phase's rate
            return (self._tick - self._started) / (self.done - self._initial)
        return None

    def count_text(self) -> str:
        percent = int(100 * self.done / self.total) if self.total else 100
        return f"{self.label}: {percent:3d}% {self.done}/{self.total} {self.unit}s"

    def line_parts(self, rate: str, tail: str) -> list[str]:
        """What follows the count; a subclass adds its own figures (training: loss, lr, memory)."""
        return [rate, tail]

    def close(self, *, final_line: bool = True) -> None:
        """The phase ended: the bar closes, or the last line (count, rate over the phase, time taken) is written."""
        if self.bar is not None:
            self.bar.close()
        elif self.lines and final_line:
            self.write_line(final=True)
