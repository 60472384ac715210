"""hvtune: reproducible LoRA training for HunyuanVideo 1.5."""

import os
from pathlib import Path

__version__ = "0.1.0"


def _cpu_thread_defaults() -> None:
    """CPU runs must not depend on the machine being idle. torch's OpenMP threads spin-wait between parallel regions:
    on a busy 2-core box a training step took ~40x longer than with one thread. PASSIVE makes them sleep instead
    (same thread count, so the same numbers). In a container limited by a CPU quota (docker --cpus) torch would still
    start a thread per host core; the quota caps the count. Set here, before anything imports torch; a value already
    in the environment wins (docs/CONTAINERS.md, "CPU threads")."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()  # cgroup v2; "max" = no quota
        cpus = max(1, int(quota) // int(period))
    except (OSError, ValueError):
        return
    if cpus < (os.cpu_count() or cpus):
        os.environ.setdefault("OMP_NUM_THREADS", str(cpus))


_cpu_thread_defaults()
