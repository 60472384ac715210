"""What the scan knows of a source file without decoding it: its content hash and metadata (video stream or image
header), remembered in a `ProbeIndex` between runs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hvtune.files import write_text_atomic


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class ProbeIndex:
    """Remembers each source's content hash and metadata, trusted while (size, mtime_ns) are unchanged (the rule make
    and rsync use), so a fully cached rerun neither rehashes nor re-probes. `hvtune cache verify` rehashes entries."""

    VERSION = 1

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        self.used: set[str] = set()
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("version") == self.VERSION:
                    self.entries = data.get("files", {})
            except (OSError, ValueError, AttributeError):
                self.entries = {}

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int]:
        st = path.stat()
        return st.st_size, st.st_mtime_ns

    def get(self, path: Path) -> dict[str, Any] | None:
        entry = self.entries.get(str(path))
        if entry is None or tuple(entry["stamp"]) != self._stamp(path):
            return None
        self.used.add(str(path))
        return entry

    def put(self, path: Path, sha256: str, meta: dict[str, Any]) -> dict[str, Any]:
        entry = {"stamp": list(self._stamp(path)), "sha256": sha256, **meta}
        self.entries[str(path)] = entry
        self.used.add(str(path))
        return entry

    def save(self) -> None:
        if self.path is None:
            return
        kept = {k: v for k, v in sorted(self.entries.items()) if k in self.used}
        write_text_atomic(self.path, json.dumps({"version": self.VERSION, "files": kept}, sort_keys=True))


def video_meta(path: Path) -> dict[str, Any]:
    from hvtune.data.media import probe_video

    info = probe_video(path)
    d = asdict(info)
    d["path"] = None
    d["notices"] = list(info.notices)
    return {"video": d}


def video_info(path: Path, meta: dict[str, Any]):
    from hvtune.data.media import VideoInfo

    d = dict(meta["video"])
    d["path"], d["notices"] = path, tuple(d["notices"])
    return VideoInfo(**d)


def image_meta(path: Path) -> dict[str, Any]:
    from PIL import Image, UnidentifiedImageError

    from hvtune.data.media import MediaError

    if path.stat().st_size == 0:
        raise MediaError(path, "zero_byte", "file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = int(img.getexif().get(0x0112, 1) or 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MediaError(path, "corrupt", f"cannot be read as an image ({e})") from e
    if orientation in (5, 6, 7, 8):  # EXIF transposes that swap width and height
        width, height = height, width
    return {"image": {"width": width, "height": height, "orientation": orientation}}
