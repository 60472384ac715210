"""One writer at a time: the lock `hvtune cache` holds on its cache and `hvtune train` on its output folder.

An advisory `flock` on a small file, which the kernel releases however the holder ends (an exception, SIGTERM,
kill -9, a crashed container). The holder writes its pid, host and start time into the file, so that a refusal can
name who holds it, and empties the file when it lets go. A file that still names a holder when the lock is free
was left by a process that ended without letting go (kill -9): the next command takes it over and says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hvtune.errors import UserError


class LockHeld(UserError):
    """Another process holds the lock; the message names it (pid, host) and what it is doing."""


def _holder(f) -> dict | None:
    f.seek(0)
    text = f.read().decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {"pid": "?", "host": "?", "command": text[:80]}
    return holder if isinstance(holder, dict) else None


def _rewrite(f, text: str) -> None:
    """The lock file's content, best effort: on a full disk the lock still holds, it only cannot name its holder
    (and the command goes on to say the disk is full where it writes)."""
    with contextlib.suppress(OSError):
        f.seek(0)
        f.truncate()
        f.write(text.encode())


def describe_holder(holder: dict | None) -> str:
    """`pid 4242 on host gpu-1 (hvtune train, since 2026-12-07 14:02:11 UTC)`."""
    if not holder:
        return "a process that left no name"
    since = holder.get("since")
    when = time.strftime(", since %Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if isinstance(since, int | float) else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')} ({holder.get('command', '?')}{when})"


@contextmanager
def exclusive_lock(
    path: Path, command: str, refusal: Callable[[str], str], announce: Callable[[str], None] = print
) -> Iterator[None]:
    """Hold the lock at `path` for `command` (e.g. "hvtune train") while the block runs. Raises LockHeld with
    `refusal(holder description)` when another process holds it; a lock left by a dead holder is taken over,
    with one `announce`d line naming it."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+b", buffering=0)  # noqa: SIM115 - held for the whole block; unbuffered: nothing left to flush
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise LockHeld(refusal(describe_holder(_holder(f)))) from e
        stale = _holder(f)
        if stale is not None:
            announce(
                f"notice: took over {path} from {describe_holder(stale)}, which ended without releasing it "
                "(killed?); its work was left as it was"
            )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": int(time.time())}
        _rewrite(f, json.dumps(me))
        try:
            yield
        finally:
            _rewrite(f, "")  # released cleanly: the next holder has nothing to take over
    finally:
        f.close()  # closing the file releases the flock


def lock_holder(path: Path) -> str | None:
    """Who holds the lock at `path` now (as `describe_holder` says it), or None when it is free; takes nothing."""
    import fcntl

    if not path.is_file():
        return None
    with open(path, "a+b", buffering=0) as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return describe_holder(_holder(f))
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return None
