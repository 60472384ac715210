"""The loss curve as the page draws it: `logs/loss.jsonl` read as a stream and folded into columns of steps.

A long run's log has hundreds of thousands of rows (13 MB at 125k); the page draws at most one column per pixel, so
the server sends one bucket per column and never holds the rows: memory stays flat whatever the run's length. Each
bucket keeps the mean and also the min and max of its rows, so a spike stays visible however far it is zoomed out.

Two views:
- the whole run, incrementally: bucket `k` covers steps [k*stride, (k+1)*stride); the stride is a power of two chosen
  from the run's length (total_steps), so it stays the same for the whole run and the page only ever asks for the
  bytes written since its last offset, merging a bucket that was still filling.
- a zoomed range of steps: the log is sorted by step, so the start is found by bisecting byte offsets.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

MAX_COLUMNS = 4096


def stride_for(extent: int, columns: int) -> int:
    """Steps per bucket: the smallest power of two that fits `extent` steps into `columns` buckets."""
    need = max(1, math.ceil(max(1, extent) / max(1, columns)))
    return 1 << (need - 1).bit_length()


class Buckets:
    """Rows folded into buckets of `stride` steps: [key, first step, last step, rows, mean, min, max, last lr,
    seconds, non-finite rows]."""

    def __init__(self, stride: int, start: int = 0):
        self.stride, self.start = stride, start
        self.buckets: dict[int, list] = {}

    def add(self, step: int, loss: Any, lr: Any, seconds: Any) -> None:
        key = (step - self.start) // self.stride
        b = self.buckets.get(key)
        if b is None:
            b = self.buckets[key] = [key, step, step, 0, 0.0, None, None, None, 0.0, 0]
        b[2] = step
        if isinstance(lr, (int, float)) and math.isfinite(lr):
            b[7] = lr
        if isinstance(seconds, (int, float)) and math.isfinite(seconds):
            b[8] += seconds
        if not isinstance(loss, (int, float)) or not math.isfinite(loss):
            b[9] += 1  # NaN / inf: counted and shown, never in the mean (nor in the JSON: NaN is not JSON)
            return
        b[3] += 1
        b[4] += (loss - b[4]) / b[3]
        b[5] = loss if b[5] is None else min(b[5], loss)
        b[6] = loss if b[6] is None else max(b[6], loss)

    def rows(self) -> list[list]:
        return [self.buckets[k] for k in sorted(self.buckets)]


def _parse(line: bytes) -> tuple[int, Any, Any, Any] | None:
    try:
        row = json.loads(line)
        step = row["step"]
        return (step, row["loss"], row.get("lr"), row.get("seconds")) if isinstance(step, int) else None
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


def whole_run(path: Path, *, offset: int, inode: int | None, stride: int | None, columns: int, total: int | None):
    """The whole run's buckets from byte `offset` on (complete lines only). Starts over from 0 (`reset`) when a
    resume rewrote the log (another inode, or shorter) or when the stride changed (the run grew past its length)."""
    columns = max(16, min(MAX_COLUMNS, columns))
    try:
        with path.open("rb") as f:
            stat = os.fstat(f.fileno())
            size = stat.st_size
            wanted = stride_for(max(total or 0, last_step(f, size)), columns)
            reset = stride != wanted or (inode is not None and stat.st_ino != inode) or offset > size
            offset = 0 if reset else offset
            buckets = Buckets(wanted)
            f.seek(offset)
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a line being written: next time
                offset += len(line)
                row = _parse(line)
                if row:
                    buckets.add(*row)
    except OSError:
        return {"buckets": [], "offset": 0, "inode": None, "stride": stride, "reset": offset > 0}
    return {"buckets": buckets.rows(), "offset": offset, "inode": stat.st_ino, "stride": wanted, "reset": reset}


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
