"""One run's output folder, read the way the run page needs it: its status, record, loss rows, validation videos and
downloads, the files it may serve, and the stop request it may send. Only what a run writes is read (the names come
from `RunFiles`), so a live run, a finished one and a folder copied off a rented box all work; nothing here imports
torch, so `hvtune serve` starts in about a second.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
from pathlib import Path
from typing import Any

from hvtune.config.settings import mask_secrets
from hvtune.output.checkpoints import list_checkpoints
from hvtune.output.status import ENDED, is_stale, process_alive, read_status
from hvtune.run_files import RunFiles, files_for_each_tool
from hvtune.serve import loss_view

SERVED_SUFFIXES = {".mp4", ".webm", ".png", ".jpg", ".safetensors", ".jsonl"}


def safe_file(root: Path, relative: str) -> Path | None:
    """The file `relative` names inside `root`, or None when it is outside (`..`, absolute, a symlink that leads
    out), hidden (a temp file being written), not a regular file, or not a kind the page serves."""
    if not relative or "\x00" in relative or relative.startswith(("/", "\\")):
        return None
    parts = Path(relative).parts
    if any(part in ("..", ".") or part.startswith(".") for part in parts):
        return None
    try:
        base = root.resolve(strict=True)
        path = (base / relative).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not path.is_relative_to(base) or not path.is_file() or path.suffix.lower() not in SERVED_SUFFIXES:
        return None
    return path


class RunFolder:
    """One output folder, read the way the page needs it."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.files = RunFiles(self.root)
        self.whole_run = loss_view.WholeRun(self.files.loss_log)

    def status(self) -> dict[str, Any]:
        status = read_status(self.root) or {}
        has_record = self.files.record.is_file()
        if not status:
            status = {"state": "finished" if has_record else "waiting", "step": None}
            if has_record:  # a finished run from before status.json existed
                run = self.run_record() or {}
                status.update(step=run.get("global_step"), total_steps=run.get("global_step"))
                if run.get("stopped_early"):
                    status["state"] = "stopped"
        stale = is_stale(status)
        if stale:
            status["reason"], status["state"] = stale, "failed"
        status.pop("record", None)  # served masked by /api/record
        status.pop("pid", None)
        status["folder"] = str(self.root)
        return status

    def run_record(self) -> dict[str, Any] | None:
        """run.json when the run finished, else the inputs the status file carries; masked."""
        for read in (lambda: json.loads(self.files.record.read_text()), lambda: read_status(self.root)):
            try:
                data = read()
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and "resolved" in data:
                return mask_secrets(data)
            if isinstance(data, dict) and isinstance(data.get("record"), dict):
                return mask_secrets({"in_progress": True, "resolved": data["record"], **data["record"]})
        return None

    def loss(self, query: dict[str, str]) -> dict[str, Any]:
        """The loss curve for the page (loss_view.py): the whole run's buckets changed since byte `offset`, or the
        steps `first`..`last` of a zoomed view in at most `columns` buckets."""
        if query.get("last"):
            first, last, columns = int(query.get("first") or 0), int(query["last"]), int(query.get("columns") or 800)
            return loss_view.step_range(self.files.loss_log, first=first, last=last, columns=columns)
        status = read_status(self.root) or {}
        return self.whole_run.answer(
            offset=max(0, int(query.get("offset") or 0)),
            inode=int(query["inode"]) if query.get("inode") else None,
            stride=int(query["stride"]) if query.get("stride") else None,
            total=status.get("total_steps"),
        )

    def videos(self) -> list[dict[str, Any]]:
        """Every validation video, newest step first, with the prompt it was rendered from where the record says it
        (`validation_0` is the validation prompt; the others are training samples of `validation_using_datasets`)."""
        found = []
        prompt = self._validation_prompt()
        # the folders RunFiles.validation(step) names, read back
        for folder in sorted(self.files.validation_root.glob("step_*")):
            step = folder.name.removeprefix("step_")
            if not step.isdigit():
                continue
            for f in sorted(folder.rglob("*.mp4")):
                if f.name.startswith("."):
                    continue
                stem = f.stem.removesuffix("_ema")
                found.append(
                    {
                        "step": int(step),
                        "name": f.name,
                        "path": f.relative_to(self.root).as_posix(),
                        "group": stem,
                        "prompt": prompt if stem == "validation_0" else None,
                    }
                )
        return sorted(found, key=lambda v: (-v["step"], v["name"]))

    def _validation_prompt(self) -> str | None:
        record = self.run_record() or {}
        config = (record.get("resolved") or {}).get("config") or {}
        prompt = config.get("validation_prompt")
        return prompt if isinstance(prompt, str) else None

    def downloads(self) -> list[dict[str, Any]]:
        files = [(f"LoRA for {tool}", path) for tool, path in files_for_each_tool(self.files)]
        checkpoints = list_checkpoints(self.root)
        if checkpoints:
            label = f"latest checkpoint's LoRA ({checkpoints[-1].name}; for resuming, not ComfyUI)"
            files.append((label, checkpoints[-1] / "lora.safetensors"))
        files += [("loss curve (PNG)", self.files.loss_plot), ("loss log", self.files.loss_log)]
        out = []
        for label, path in files:
            if path.is_file():
                rel = path.relative_to(self.root).as_posix()
                out.append({"label": label, "path": rel, "bytes": path.stat().st_size})
        return out

    def log_tail(self, lines: int = 40) -> dict[str, Any]:
        """The last lines of the run's logs: the loss log's rows and the libraries' log (warnings, load notices);
        read from the end, at most 32 kB each, token-shaped strings masked."""
        tails = {"loss": _tail(self.files.loss_log, lines), "libraries": _tail(self.files.library_log, lines)}
        return mask_secrets(tails)  # a library may log a URL or a header with a token in it

    def resume_command(self) -> str | None:
        """The command that resumes a stopped run from its latest checkpoint, when the record names its config."""
        record = self.run_record() or {}
        config_path = (record.get("resolved") or {}).get("config_path")
        if not list_checkpoints(self.root):
            return None
        config = f"--config {shlex.quote(str(config_path))} " if config_path else ""
        return f"hvtune train {config}--output_dir={shlex.quote(str(self.root))} --resume_from_checkpoint=latest"


def _tail(path: Path, lines: int) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 32768))
            data = f.read()
    except OSError:
        return []
    return [line.decode("utf-8", "replace") for line in data.splitlines()[-lines:]]


def request_stop(output_dir: Path) -> tuple[bool, str]:
    """Send the run's training process SIGTERM, as `docker stop` does: it checkpoints at the next step boundary and
    exits. Only a live hvtune process on this machine that the status file names."""
    status = read_status(output_dir)
    if not status or status.get("state") in ENDED or status.get("state") == "caching":
        return False, "no training is running in this folder"
    pid = status.get("pid")
    if status.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False, "training runs on another machine or container: stop it there (docker stop)"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        cmdline = b"hvtune" if process_alive(pid) else b""
    if b"hvtune" not in cmdline:
        return False, f"the training process (pid {pid}) is gone"
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError as e:
        return False, f"could not signal pid {pid}: {e.strerror}"
    step = status.get("step") or 0
    return True, f"stop requested: training writes a checkpoint at the end of step {step + 1} and exits"
