"""`run.json`: what a finished (or stopped) training run was, written by the trainer at its end and read by
`hvtune compare`, the run page and the next `train` in the same folder (`checkpoints.plan_start`)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from hvtune.output.checkpoints import LoopState
from hvtune.output.record import environment, sha256_json
from hvtune.run_files import RunFiles
from hvtune.train.ema import EXPORT_DIR as EMA_EXPORT_DIR


def run_record(
    resolved,
    manifest,
    paths,
    *,
    state: LoopState,
    world: int,
    determinism: dict,
    started: float,
    stopped_early: bool,
    lora_path: Path | None,
) -> dict[str, Any]:
    """The record of a run in `resolved.train.output_dir`: its resolved config, seeds, data, model, environment and
    outputs. `lora_path`: the exported LoRA (None when the run stopped before exporting); `started`: time.time() at
    its start."""
    lora_sha = hashlib.sha256(lora_path.read_bytes()).hexdigest() if lora_path else None
    ema_path = lora_path.parent / EMA_EXPORT_DIR / lora_path.name if lora_path else None  # use_ema's copy
    record = resolved.to_record()
    out = Path(resolved.train.output_dir)
    return {
        "hvtune_run": 1,
        "config_hash": sha256_json(record["config"]),
        "resolved": record,
        "seeds": {"seed": resolved.train.seed, "validation_seed": resolved.train.validation_seed},
        "world_size": world,
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
