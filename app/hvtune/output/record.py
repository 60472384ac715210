"""The run record: everything needed to repeat a run and compare it with another (`run.json`, `loss.jsonl`).

`run_record` is `run.json`: what a finished (or stopped) run was, written by the trainer at its end and read by
`hvtune compare`, the run page and the next `train` in the same folder (`checkpoints.plan_start`).
Determinism knobs live here too because they are part of what a run is: they are set before the first CUDA call
and written into the record with the environment they depend on.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from hvtune.files import atomic_path, write_text_atomic
from hvtune.output.checkpoints import LoopState
from hvtune.run_files import RunFiles

PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "huggingface_hub",
    "torchao",
    "bitsandbytes",
    "av",
    "pydantic",
    "hvtune",
)
# Environment that changes numerics or kernels selection; recorded so a second vendor can match it.
DETERMINISM_ENV = {
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    "PYTORCH_TUNABLEOP_ENABLED": "0",
    "HIPBLASLT_ALLOW_TF32": "0",
    "TORCH_BLAS_PREFER_HIPBLASLT": "1",
}
IMAGE_LABEL_ENV = (
    "HVTUNE_IMAGE",
    "HVTUNE_IMAGE_VARIANT",
    "HVTUNE_BASE_IMAGE",
    "HVTUNE_BASE_DIGEST",
    "HVTUNE_LOCK_SHA256",
    "HVTUNE_TORCH_INDEX",
)


def sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def apply_determinism(enabled: bool) -> dict[str, Any]:
    """Set the knobs for bitwise-repeatable runs on one software stack and GPU model; returns what was set.

    Must run before the first CUDA call (cuBLAS reads its workspace setting at initialisation)."""
    import torch

    knobs: dict[str, Any] = {"deterministic": enabled}
    if enabled:
        for key, value in DETERMINISM_ENV.items():
            os.environ.setdefault(key, value)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    knobs["env"] = {key: os.environ.get(key) for key in DETERMINISM_ENV}
    knobs["torch"] = {
        "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    return knobs


def environment() -> dict[str, Any]:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "torch_cuda": torch.version.cuda,
        "torch_hip": torch.version.hip,
        "image": {k: os.environ[k] for k in IMAGE_LABEL_ENV if k in os.environ},
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": props.name,
            "count": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}",
            "arch": getattr(props, "gcnArchName", None) or f"sm_{props.major}{props.minor}",
            "memory_gb": round(props.total_memory / 2**30, 1),
            "driver": _driver_version(),
        }
    else:
        env["gpu"] = None
    return env


def _driver_version() -> str | None:
    for path in ("/proc/driver/nvidia/version", "/sys/module/amdgpu/version"):
        try:
            return Path(path).read_text().split("\n")[0].strip()
        except OSError:
            continue
    return None


class LossLog:
    """Append-only per-step log (`loss.jsonl`); survives a crash up to the last flushed step."""

    def __init__(self, path: Path, resume_from_step: int = 0, say: Callable[[str], None] = print):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # a resumed run keeps the steps before its checkpoint and redoes the rest
            kept = [row for row in read_loss_log(path, say) if row["step"] <= resume_from_step]
            write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))
        self._file = path.open("a")

    def write(self, **row: Any) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_loss_log(path: Path, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The rows of a loss log. A line a kill or a full disk cut short cannot be read: it is skipped, and `say` tells
    which, so a resume or a comparison goes on with every step that was written whole."""
    rows, damaged = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            int(row["step"]), float(row["loss"])
        except (ValueError, KeyError, TypeError):
            damaged.append(number)
            continue
        rows.append(row)
    if damaged:
        lines = ", ".join(map(str, damaged[:5])) + (" ..." if len(damaged) > 5 else "")
        say(f"{path}: skipped {len(damaged)} damaged line(s) (line {lines}): cut short by a kill or a full disk")
    return rows


def plot_losses(path: Path, curves: dict[str, list[tuple[int, float]]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for label, points in curves.items():
        if points:
            steps, losses = zip(*points, strict=True)
            ax.plot(steps, losses, label=label, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")  # the temp name ends in .tmp: say the format
    plt.close(fig)


# ------------------------------------------------------------------------------------ run.json, written at the end


def run_record(
    resolved,
    manifest,
    paths,
    *,
    state: LoopState,
    parallelism: dict,
    determinism: dict,
    started: float,
    stopped_early: bool,
    lora_path: Path | None,
) -> dict[str, Any]:
    """The record of a run in `resolved.train.output_dir`: its resolved config, seeds, data, model, environment and
    outputs. `lora_path`: the exported LoRA (None when the run stopped before exporting); `started`: time.time() at
    its start; `parallelism`: world_size, sharding (none / ddp / fsdp2), context_parallel_size."""
    lora_sha = hashlib.sha256(lora_path.read_bytes()).hexdigest() if lora_path else None
    ema_path = RunFiles(lora_path.parent).ema.lora if lora_path else None  # use_ema's copy
    record = resolved.to_record()
    out = Path(resolved.train.output_dir)
    return {
        "hvtune_run": 1,
        "config_hash": sha256_json(record["config"]),
        "resolved": record,
        "seeds": {"seed": resolved.train.seed, "validation_seed": resolved.train.validation_seed},
        "world_size": parallelism["world_size"],
        "parallelism": parallelism,
        "global_step": state.global_step,
        "stopped_early": stopped_early,
        "run": state.run,
        "dataset_manifest_hash": manifest.samples_hash,
        "cache_fingerprint": manifest.fingerprint,
        "model": paths.record(),
        "determinism": determinism,
        "environment": environment(),
        "timings": {"total_s": round(time.time() - started, 2)},
        "outputs": {
            "lora": str(lora_path) if lora_path else None,
            "lora_sha256": lora_sha,
            "ema_lora": str(ema_path) if ema_path and ema_path.is_file() else None,
            "loss_log": RunFiles(out).loss_log.relative_to(out).as_posix(),
        },
    }
