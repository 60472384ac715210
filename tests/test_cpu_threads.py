"""CPU runs do not depend on the machine being idle: importing hvtune (what `hvtune` and `python -m hvtune` do
before torch) makes torch's OpenMP threads sleep instead of spin-wait, keeps torch's thread count (so the numbers are
the same), caps it to a container's CPU quota, and leaves a value the user set alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import hvtune, os, torch; print(os.environ.get('OMP_WAIT_POLICY'), torch.get_num_threads())"


def probe(**env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    base["PYTHONPATH"] = str(ROOT / "app")
    proc = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_hvtune_makes_cpu_threads_sleep_and_keeps_their_count():
    policy, threads = probe()
    assert policy == "PASSIVE"
    bare = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        env={k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))},
        capture_output=True,
        text=True,
    )
    from hvtune import _cpu_quota

    if not _cpu_quota():  # no container CPU quota here: torch's own count, so the same numbers
        assert threads == bare.stdout.strip()


def test_a_value_the_user_set_wins():
    assert probe(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1") == ["ACTIVE", "1"]
