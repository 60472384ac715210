"""Runs a benchmark script as its docs say (`PYTHONPATH=app python benchmarks/SCRIPT ...`), offline, from the root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "app"), "HF_HUB_OFFLINE": "1"}
    env.pop("HVTUNE_QWEN_TOKENIZER", None)  # the built-in tokenizer fallbacks, as on a fresh machine
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc
