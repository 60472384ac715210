"""Captions: the caption variants of one sample, by its dataset's `caption_strategy` (SimpleTuner's meanings).

Decisions (documented for users here and in the cache report):

- Captions: `textfile` reads `<stem>.txt` beside the file; every non-empty line is one caption variant (SimpleTuner's
  multi-caption rule; the variant used for a draw is `draw % len(captions)`). `filename` uses the stem with `_` turned
  into spaces. `instanceprompt` uses `instance_prompt`. `metadata` reads `metadata_file` (jsonl objects or a csv with
  a header, columns `file` and `caption`; `file` is the path relative to `instance_data_dir`, or a bare file name).
  A caption that is not valid UTF-8 is REJECTED (`caption_not_utf8`, with the byte offset): decoding with replacement
  characters would silently train on text the user never wrote. A UTF-8 byte-order mark is accepted and dropped.
  Missing or whitespace-only captions are skipped (`missing_caption`, `empty_caption`).
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from hvtune.config.settings import DatasetConfig
from hvtune.data.issues import DatasetError


def _decode_caption(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(
            "caption_not_utf8",
            f"{where} is not valid UTF-8 (byte {e.start}: {data[e.start : e.start + 4]!r}); "
            "save it as UTF-8 (captions are rejected rather than decoded with replacement characters)",
        ) from e


def _split_captions(text: str, where: str) -> list[str]:
    lines = [" ".join(line.split()) for line in text.splitlines()]
    captions = [line for line in lines if line]
    if not captions:
        raise DatasetError("empty_caption", f"{where} is empty")
    return captions


class Captions:
    """Caption lookup for one dataset; `metadata` files are read once."""

    def __init__(self, ds: DatasetConfig, root: Path, config_path: Path | None):
        self.ds, self.root = ds, root
        self.table: dict[str, str] | None = None
        self.table_error: DatasetError | None = None
        self.notices: list[str] = []
        self.metadata_path: Path | None = None
        if ds.caption_strategy == "metadata":
            try:
                self.metadata_path = self._metadata_path(config_path)
                self.table = self._read_metadata(self.metadata_path)
            except DatasetError as e:
                self.table_error = e

    def _metadata_path(self, config_path: Path | None) -> Path:
        p = Path(self.ds.metadata_file or "").expanduser()
        candidates = [p] if p.is_absolute() else [self.root / p, Path.cwd() / p]
        if config_path is not None and not p.is_absolute():
            candidates += [config_path.parent / p, config_path.parent.parent / p]
        for c in candidates:
            if c.is_file():
                return c
        raise DatasetError("metadata_unreadable", f"metadata_file {self.ds.metadata_file} not found")

    def _read_metadata(self, path: Path) -> dict[str, str]:
        text = _decode_caption(path.read_bytes(), f"metadata_file {path}")
        rows: list[dict[str, Any]] = []
        if path.suffix.lower() == ".csv":
            rows = list(csv.DictReader(io.StringIO(text)))
        else:
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    self.notices.append(f"{path}:{n}: not JSON ({e.msg}); line ignored")
                    continue
                if isinstance(row, dict):
                    rows.append(row)
        table: dict[str, str] = {}
        for row in rows:
            name = row.get("file") or row.get("file_name")
            if name is None or row.get("caption") is None:
                continue
            table[Path(str(name)).as_posix()] = str(row["caption"])
        return table

    def _instance_prompts(self) -> list[str]:
        prompt = self.ds.instance_prompt
        if isinstance(prompt, list):
            return [p for p in (" ".join(str(x).split()) for x in prompt) if p] or _split_captions(
                "", "instance_prompt"
            )
        return _split_captions(prompt or "", "instance_prompt")

    def __call__(self, path: Path, rel: str) -> list[str]:
        """Captions with SimpleTuner's only_instance_prompt / prepend_instance_prompt (helpers/prompts.py)."""
        if self.ds.only_instance_prompt or self.ds.caption_strategy == "instanceprompt":
            return self._instance_prompts()
        captions = self._captions(path, rel)
        if self.ds.prepend_instance_prompt and self.ds.instance_prompt:
            prefix = self._instance_prompts()[0]
            captions = [f"{prefix} {c}" for c in captions]
        return captions

    def _captions(self, path: Path, rel: str) -> list[str]:
        strategy = self.ds.caption_strategy
        if strategy == "filename":
            return _split_captions(re.sub(r"[_]+", " ", path.stem), f"file name {path.name}")
        if strategy == "metadata":
            if self.table_error is not None:
                raise self.table_error
            assert self.table is not None
            caption = self.table.get(rel, self.table.get(path.name))
            if caption is None:
                raise DatasetError("missing_caption", f"no row for {rel} in metadata_file {self.ds.metadata_file}")
            return _split_captions(caption, f"caption of {rel} in metadata_file")
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            raise DatasetError("missing_caption", f"caption file {txt.name} not found beside it")
        return _split_captions(
            _decode_caption(txt.read_bytes(), f"caption file {txt.name}"), f"caption file {txt.name}"
        )
