"""The loss curve as the page draws it: `logs/loss.jsonl` read as a stream and folded into columns of steps.

A long run's log has hundreds of thousands of rows (13 MB at 125k); the page draws at most one column per pixel, so
the server sends one bucket per column and never holds the rows: memory stays flat whatever the run's length. Each
bucket keeps the mean and also the min and max of its rows, so a spike stays visible however far it is zoomed out.

Two views:
- the whole run (`WholeRun`), at most COLUMNS buckets: bucket `k` covers steps [k*stride, (k+1)*stride); the stride
  is a power of two chosen from the run's length (total_steps), so it stays the same for the whole run. The server
  reads the log once and then only what was appended; a page asks with the byte offset of its last answer and gets
  only the buckets that changed since (none, on a finished run).
- a zoomed range of steps: the log is sorted by step, so the start is found by bisecting byte offsets.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = 2048  # the whole-run view: enough for a 4k-wide chart (the page folds them into its pixel columns)
MAX_COLUMNS = 4096
# the rows hvtune's LossLog writes; anything else (a hand-edited line) goes through json
ROW = re.compile(rb'\{"step": (\d+), "loss": ([^,}]+), "lr": ([^,}\n]+)')
ROWS = re.compile(ROW.pattern.replace(b"\\{", b"^\\{", 1), re.MULTILINE)
CHUNK = 1 << 20  # bytes read at a time: what a long log costs in memory while it is read


def stride_for(extent: int, columns: int) -> int:
    """Steps per bucket: the smallest power of two that fits `extent` steps into `columns` buckets."""
    need = max(1, math.ceil(max(1, extent) / max(1, columns)))
    return 1 << (need - 1).bit_length()


class Buckets:
    """Rows folded into buckets of `stride` steps: [key, first step, last step, rows, mean, min, max, last lr,
    non-finite rows]; `touched[key]`: the byte offset just past the last row added to it."""

    def __init__(self, stride: int, start: int = 0):
        self.stride, self.start = stride, start
        self.buckets: dict[int, list] = {}
        self.touched: dict[int, int] = {}

    def add(self, step: int, loss: Any, lr: Any, end: int = 0) -> None:
        finite = isinstance(loss, (int, float)) and math.isfinite(loss)
        value = float(loss) if finite else 0.0
        lr = lr if isinstance(lr, (int, float)) else None
        self.merge((step - self.start) // self.stride, (step, step, int(finite), value, value, value, lr, 1), end)

    def merge(self, key: int, summary: tuple, end: int) -> None:
        """Fold rows already reduced into bucket `key`: (first step, last step, finite rows, their mean, min, max,
        last lr), all the rows counted; those not finite (NaN, inf) only counted, never in the mean (nor in the
        JSON: NaN is not JSON)."""
        first, last, n, mean, low, high, lr, rows = summary
        b = self.buckets.get(key)
        if b is None:
            b = self.buckets[key] = [key, first, last, 0, 0.0, None, None, None, 0]
        b[2], self.touched[key] = last, end
        if lr is not None and math.isfinite(lr):
            b[7] = lr
        b[8] += rows - n
        if n:
            b[4] = (b[4] * b[3] + mean * n) / (b[3] + n)
            b[3] += n
            b[5] = low if b[5] is None else min(b[5], low)
            b[6] = high if b[6] is None else max(b[6], high)

    def add_chunk(self, chunk: bytes, end: int) -> None:
        """Every row of `chunk` (whole lines): parsed and reduced per bucket with numpy, as a long log's first read
        would otherwise spend seconds in Python; lines of another shape go through `_parse`."""
        found = ROWS.findall(chunk)
        if len(found) != chunk.count(b"\n"):  # a damaged or hand-written line: row by row
            for line in chunk.splitlines():
                row = _parse(line)
                if row:
                    self.add(*row, end=end)
            return
        if not found:
            return
        steps = np.array([r[0] for r in found], dtype=np.int64)
        losses = np.array([r[1] for r in found]).astype(np.float64)
        lrs = np.array([b"nan" if r[2] == b"null" else r[2] for r in found]).astype(np.float64)
        keys = (steps - self.start) // self.stride
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        ends = np.r_[starts[1:], len(keys)]
        good = np.isfinite(losses)
        counts = np.add.reduceat(good.astype(np.int64), starts)
        sums = np.add.reduceat(np.where(good, losses, 0.0), starts)
        lows = np.minimum.reduceat(np.where(good, losses, np.inf), starts)
        highs = np.maximum.reduceat(np.where(good, losses, -np.inf), starts)
        for k in range(len(starts)):
            n, last = int(counts[k]), ends[k] - 1
            mean = float(sums[k]) / n if n else 0.0
            summary = (int(steps[starts[k]]), int(steps[last]), n, mean, float(lows[k]), float(highs[k]))
            self.merge(int(keys[starts[k]]), (*summary, float(lrs[last]), int(ends[k] - starts[k])), end)

    def rows(self, since: int = -1) -> list[list]:
        """The buckets, in step order; only those a row past byte `since` went into."""
        return [self.buckets[k] for k in sorted(self.buckets) if self.touched[k] > since]


def _parse(line: bytes) -> tuple[int, Any, Any] | None:
    fast = ROW.match(line)
    if fast:
        try:
            lr = fast.group(3)
            return int(fast.group(1)), float(fast.group(2)), None if lr == b"null" else float(lr)
        except ValueError:
            pass
    try:
        row = json.loads(line)
        step = row["step"]
        return (step, row["loss"], row.get("lr")) if isinstance(step, int) else None
    except (ValueError, KeyError, TypeError):
        return None  # a damaged line is skipped, not the whole curve


def last_step(f: io.BufferedReader, size: int) -> int:
    """The step of the log's last complete line (0 when there is none): read from the end, not the whole file."""
    f.seek(max(0, size - 4096))
    tail = f.read(4096)
    for line in reversed(tail[: tail.rfind(b"\n") + 1].splitlines()):
        row = _parse(line)
        if row:
            return row[0]
    return 0


def _offset_of_step(f: io.BufferedReader, size: int, step: int) -> int:
    """The byte offset of the first line whose step is >= `step` (the log is sorted by step)."""
    lo, hi = 0, size
    while hi - lo > 4096:
        mid = (lo + hi) // 2
        f.seek(mid)
        f.readline()  # to the start of the next line
        row = None
        while row is None:
            line = f.readline()
            if not line:
                break
            row = _parse(line)
        if row is None or row[0] >= step:
            hi = mid
        else:
            lo = mid
    return lo


class WholeRun:
    """The whole run's view of one loss log, kept across requests (one per page server and run)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._buckets = Buckets(1)
        self._inode: int | None = None
        self._offset = 0

    def answer(self, *, offset: int, inode: int | None, stride: int | None, total: int | None) -> dict[str, Any]:
        """The buckets that changed after byte `offset` of the page's last answer (`inode`, `stride`); all of them
        (`reset`) when the page has none yet, a resume rewrote the log or the run grew past its length."""
        with self._lock:
            self._catch_up(total)
            b = self._buckets
            reset = stride != b.stride or inode != self._inode or offset > self._offset
            return {
                "buckets": b.rows(-1 if reset else offset),
                "offset": self._offset,
                "inode": self._inode,
                "stride": b.stride,
                "reset": reset,
            }

    def _catch_up(self, total: int | None) -> None:
        try:
            f = self.path.open("rb")
        except OSError:
            self._buckets, self._inode, self._offset = Buckets(1), None, 0
            return
        with f:
            stat = os.fstat(f.fileno())
            wanted = stride_for(max(total or 0, last_step(f, stat.st_size)), COLUMNS)
            if stat.st_ino != self._inode or stat.st_size < self._offset or wanted != self._buckets.stride:
                self._buckets, self._inode, self._offset = Buckets(wanted), stat.st_ino, 0
            f.seek(self._offset)
            while chunk := f.read(CHUNK):
                whole = chunk[: chunk.rfind(b"\n") + 1]  # a line being written: next time
                if not whole:
                    break
                self._offset += len(whole)
                f.seek(self._offset)
                self._buckets.add_chunk(whole, self._offset)


def step_range(path: Path, *, first: int, last: int, columns: int) -> dict[str, Any]:
    """Steps `first`..`last` (a zoomed view) in at most `columns` buckets."""
    columns = max(16, min(MAX_COLUMNS, columns))
    first, last = max(0, first), max(first, last)
    buckets = Buckets(math.ceil((last - first + 1) / columns), first)
    try:
        with path.open("rb") as f:
            f.seek(_offset_of_step(f, os.fstat(f.fileno()).st_size, first))
            for line in f:
                row = _parse(line) if line.endswith(b"\n") else None
                if row and row[0] > last:
                    break
                if row and row[0] >= first:
                    buckets.add(*row)
    except OSError:
        pass
    return {"buckets": buckets.rows(), "stride": buckets.stride, "first": first, "last": last}
