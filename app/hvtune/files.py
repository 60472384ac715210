"""Atomic writes: every file and directory hvtune writes appears complete or not at all.

The rule (docs/ARCHITECTURE.md): write to a temp name in the same directory (a rename is only atomic within one
filesystem), then `os.replace` it over the target. A run that is killed leaves the old file, or nothing, plus at most
a hidden `.<name>.<pid>.<random>.tmp` that `is_temp_name` recognises (the cache removes those on its next run).

Temp files are created with mode 0o666 and temp directories with 0o777, both less the umask, as `open` and `mkdir`
would: outputs are read from containers by other users, so they must not end up 0o600 like `tempfile.mkstemp`'s.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def is_temp_name(name: str) -> bool:
    """True for the name of a temp file or directory left by a killed `atomic_path` / `atomic_directory`."""
    return name.startswith(".") and name.endswith(".tmp")


def _temp_beside(path: Path) -> Path:
    # Ends in .tmp, not in path's suffix, so globs such as `*.safetensors` or `*.mp4` never pick up a half-written
    # file; writers that guess the format from the name must be told it (PIL `format=`, av `format=`, ...).
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, durable: bool = True) -> Iterator[Path]:
    """Yield a temp path beside `path` for a writer that wants a file name; when the block succeeds the file is
    fsynced and renamed over `path`, when it raises (KeyboardInterrupt too) the temp is removed and `path` is left
    as it was. `durable=False` skips the fsync: readers still never see half a file, but a power cut may lose it
    (for files rewritten every second, such as status.json, where the fsync would be most of the cost)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # EXCL: never another writer's temp
    try:
        yield tmp
        if durable:
            _fsync(tmp)  # the data is on disk before the name points at it: no empty file after a power cut
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> int:
    """Write `data` to `path` atomically; returns the number of bytes written."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return len(data)


def write_text_atomic(path: str | os.PathLike[str], text: str, *, durable: bool = True) -> int:
    """Write `text` as UTF-8 to `path` atomically; returns the number of bytes written."""
    return write_bytes_atomic(path, text.encode("utf-8"), durable=durable)


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, durable: bool = True, **json_kwargs: Any) -> int:
    """`data` as JSON plus a newline, atomically. Defaults (indent 2, sorted keys, str() for anything else) are the
    run record's; `json_kwargs` override them."""
    options: dict[str, Any] = {"indent": 2, "sort_keys": True, "default": str, **json_kwargs}
    return write_text_atomic(path, json.dumps(data, **options) + "\n", durable=durable)


def _fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then the folders: a checkpoint's completeness marker must not reach the disk
    before the weights it vouches for."""
    paths = list(root.rglob("*"))
    for path in [p for p in paths if not p.is_dir()] + [p for p in reversed(paths) if p.is_dir()] + [root]:
        _fsync(path)


@contextmanager
def atomic_directory(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp directory beside `out` that replaces `out` (and whatever it held) when the block succeeds and
    vanishes when it fails. Its files are fsynced before the rename; an existing `out` is renamed aside first and
    removed after, so at no moment is there a half-deleted `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(out)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = _temp_beside(out) if out.exists() else None
        if old is not None:
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:  # put the previous one back rather than lose both
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------ room to write


def _existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (what a write there would land on)."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def writable_dir_problem(path: str | os.PathLike[str]) -> str | None:
    """Why `path` cannot be a folder hvtune writes into, found without creating anything; None when it can."""
    path = Path(path).expanduser()
    probe = _existing(path)
    if not probe.is_dir():
        return f"{probe} is a file, not a folder" + ("" if probe == path.absolute() else f" (on the way to {path})")
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by uid {os.getuid()}: fix its permissions or pick another folder"
    return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def free_space_problem(path: str | os.PathLike[str], need: int, what: str, fix: str) -> str | None:
    """One line when the disk holding `path` has less than `need` bytes free for `what` (refuse early, not with a
    traceback half way through a write); `fix` says what to do."""
    probe = _existing(Path(path))
    free = shutil.disk_usage(probe).free
    if free < need:
        return f"disk full: {what} needs about {_gb(need)} but {probe} has {_gb(free)} free; {fix}"
    return None


def is_disk_full(error: BaseException) -> bool:
    """An OSError for a full disk or quota, or torch.save's RuntimeError for a write that could not complete."""
    import errno

    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    text = str(error)
    return isinstance(error, RuntimeError) and ("unexpected pos" in text or "No space left" in text)


def disk_full_message(path: str | os.PathLike[str], what: str, fix: str) -> str:
    probe = _existing(Path(path))
    return f"disk full while writing {what} to {probe} ({_gb(shutil.disk_usage(probe).free)} free): {fix}"
