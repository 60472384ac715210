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
    cpus = _cpu_quota()
    if cpus and cpus < (os.cpu_count() or cpus):
        os.environ.setdefault("OMP_NUM_THREADS", str(cpus))


def _cpu_quota() -> int | None:
    """Whole CPUs of this cgroup's quota (docker --cpus), cgroup v2 or v1; None without a quota."""
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            fields = Path("/sys/fs/cgroup", quota_file).read_text().split()
            if period_file:
                fields.append(Path("/sys/fs/cgroup", period_file).read_text().strip())
            quota, period = int(fields[0]), int(fields[1])
        except (OSError, ValueError, IndexError):
            continue  # "max" (v2) or no such file
        return max(1, quota // period) if quota > 0 else None  # v1: -1 = no quota
    return None


_cpu_thread_defaults()
