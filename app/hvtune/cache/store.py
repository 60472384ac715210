"""The cache's entries: where one lies, how it is written and read, how damage is found, and each root's index.

`hvtune cache` (build.py) writes entries through this module; the trainer reads them through the manifest
(manifest.py). What names an entry: keys.py; where the roots lie: layout.py.

One safetensors file per entry at `<root>/<key[:2]>/<key>.safetensors`, written to a temp file in the same folder,
fsynced, then renamed: a killed run leaves complete entries or none (stray temp files are removed by the next run).
Each root has an `index.json` (key -> kind, bytes, sha256, label) written at the end of a run; `verify_cache`
rehashes against it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from hvtune.cache.keys import FORMAT, TEXT_2_MAX_LENGTH, TEXT_MAX_LENGTH
from hvtune.errors import UserError
from hvtune.files import is_temp_name, write_bytes_atomic, write_text_atomic


class CacheError(UserError):
    """The cache is missing, stale or incomplete, or a dataset has nothing usable; the message says what to run."""


def entry_path(root: Path, key: str) -> Path:
    return Path(root) / key[:2] / f"{key}.safetensors"


def entry_metadata(key: str, meta: dict[str, str]) -> dict[str, str]:
    """An entry's safetensors metadata: one key holding canonical JSON. safetensors writes several keys in a
    per-process hash order, and the same entry must be the same bytes whichever process wrote it."""
    return {"hvtune": json.dumps({"format": FORMAT, "key": key, **meta}, sort_keys=True, ensure_ascii=False)}


def write_entry(root: Path, key: str, tensors: dict[str, Any], meta: dict[str, str]) -> tuple[int, str]:
    """Atomic: temp file in the entry's folder, fsync, rename. Returns (bytes, sha256)."""
    from safetensors.torch import save

    path = entry_path(root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=entry_metadata(key, meta))
    return write_bytes_atomic(path, data), hashlib.sha256(data).hexdigest()


def _header(path: Path) -> tuple[int, int, dict[str, Any]]:
    """(file size, header length, header) of a safetensors file; ValueError when there is no readable header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > size - 8:
            raise ValueError(f"{size} bytes, no readable safetensors header")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("unreadable header")
    return size, length, header


def entry_damage(path: Path) -> str | None:
    """Why the entry at `path` cannot be read, from what is cheap to check on every run (no hashing: that is
    `hvtune cache verify`): it exists, its safetensors header parses, and the file is as long as the header says.
    None when it looks whole. Catches truncated and zeroed files (a full disk, a copy cut short)."""
    try:
        size, length, header = _header(path)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"damaged: {e}"
    if 8 + length + end != size:
        return f"damaged: {size} bytes, its header describes {8 + length + end}"
    return None


def text_cut(path: Path) -> str | None:
    """Which token limit a text entry's caption reached (it was cut there), read from its header; None if none."""
    try:
        header = _header(path)[2]
    except (OSError, ValueError):
        return None
    if header.get("prompt_embeds", {}).get("shape", [0])[0] >= TEXT_MAX_LENGTH:
        return f"the text encoder's limit of {TEXT_MAX_LENGTH} tokens"
    if header.get("prompt_embeds_2", {}).get("shape", [0])[0] >= TEXT_2_MAX_LENGTH:
        return f"the glyph encoder's limit of {TEXT_2_MAX_LENGTH} bytes of quoted text"
    return None


def entry_intact(path: Path) -> bool:
    return entry_damage(path) is None


def read_entry(path: Path, repair_hint: str) -> dict[str, Any]:
    """An entry's tensors; a damaged one (`load_manifest` checks sizes and headers, not contents) is named with the
    command that repairs it instead of a safetensors traceback."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CacheError(f"cache entry damaged: {path} ({e}): {repair_hint}") from e


def remove_temp_files(root: Path) -> None:
    """Remove temp files a killed run left in the entry folders."""
    if not root.is_dir():
        return
    with os.scandir(root) as shards:
        for shard in shards:
            if shard.is_dir() and len(shard.name) == 2:
                with os.scandir(shard.path) as files:
                    for f in files:
                        if is_temp_name(f.name):
                            Path(f.path).unlink(missing_ok=True)


class RootIndex:
    """`<root>/index.json`: key -> {kind, bytes, sha256, label}. Rewritten at the end of a run."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / "index.json"
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if data.get("format") == FORMAT:
                    self.entries = data.get("entries", {})
            except (OSError, ValueError, AttributeError):
                self.entries = {}

    def add(self, key: str, kind: str, label: str, nbytes: int | None = None, sha: str | None = None) -> None:
        if nbytes is None or sha is None:
            known = self.entries.get(key)
            path = entry_path(self.root, key)
            if known and known.get("bytes") == path.stat().st_size:
                nbytes, sha = known["bytes"], known["sha256"]
            else:
                data = path.read_bytes()
                nbytes, sha = len(data), hashlib.sha256(data).hexdigest()
        self.entries[key] = {"kind": kind, "bytes": nbytes, "sha256": sha, "label": label[:200]}

    def save(self) -> int:
        kept = {k: v for k, v in sorted(self.entries.items()) if entry_path(self.root, k).is_file()}
        data = json.dumps({"format": FORMAT, "entries": kept}, sort_keys=True, indent=0, ensure_ascii=False)
        return write_text_atomic(self.path, data)
