"""`hvtune cache` on N processes (`accelerate launch --num_processes N -m hvtune cache`, or the container's `cache`
service with NUM_PROCESSES=N): one process per GPU, the same cache as one process builds, byte for byte.

The split. Each encoding phase (text, which holds the validation prompts; VAE latents with the i2v condition
latents; SigLIP) first agrees on what is missing (every process checks the entries after the same barrier, so all see
the same list), then process r encodes the missing entries at positions r, r + N, r + 2N... of that list sorted by
entry key: deterministic (the same misses give each process the same work on a rerun), balanced to one entry, and
each entry has exactly one writer. The i2v validation entries are the main process's. Entries are atomic and
content-addressed (cache.store), so a process killed mid-phase leaves only whole entries, and a rerun with any N
encodes exactly what is missing.

What one process does for all. The main process holds the cache's lock, probes the files first (the others then read
its probe index), removes a killed run's temp files, and - after every process has finished and the decode failures
and written entries of all of them are merged, in the order one process would have met them - writes the report, the
indexes and the manifest, and records every process's device and thread count in `builds.jsonl` (`record_where`).
Progress: the main process alone shows each phase's progress (progress_lines.py: a bar on a terminal, else one
complete line per interval and a last one) with the total across processes and its ETA (each process writes its count
to `<cache_dir>/.shard_progress/<phase>.<rank>` at most once a second).

One process (no launcher, or WORLD_SIZE 1): every method here is what `build_cache` did before (and the record of
where it encoded) - the same progress, no barrier, no accelerate import. Sharding needs every process to see the same
cache_dir (one machine, or a shared disk).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from hvtune.files import write_text_atomic
from hvtune.progress_lines import ProgressLines

T = TypeVar("T")
BUILDS_FILE = "builds.jsonl"  # in the cache's root: where each build that encoded entries ran (record_where)
PROGRESS_INTERVAL_S = 1.0  # how often a process writes its count, and the main process redraws its bar


class Shard:
    """This process's place among the `hvtune cache` processes; `world` 1 when it is the only one."""

    def __init__(self, root: Path, rank: int = 0, world: int = 1, state: Any = None):
        self.rank, self.world, self.state = rank, world, state
        self.progress_dir = Path(root) / ".shard_progress"
        self._merged: set[int] = set()  # plan positions whose decode failure every process already holds

    @classmethod
    def start(cls, root: Path) -> Shard:
        """From the launcher's environment: accelerate's process group when WORLD_SIZE > 1, else a single process."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(root)
        import torch
        from accelerate import PartialState

        # the process group (NCCL on GPUs, gloo on CPUs, as the trainer's Accelerator), and this process's GPU
        state = PartialState(cpu=not torch.cuda.is_available())
        return cls(root, state.process_index, state.num_processes, state)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        """Until every process gets here."""
        if self.world > 1:
            self.state.wait_for_everyone()

    def close(self) -> None:
        """This process leaves the process group, so that it exits cleanly whichever process ends first (a process
        whose gloo group is still open when the others go can abort: `terminate called without an active exception`)."""
        if self.world > 1:
            self.state.destroy_process_group()

    def main_first(self):
        """The main process runs the block first (probing the files), then the others. The counts a killed sharded
        run left are removed first (whatever N this run has)."""
        if self.main:
            shutil.rmtree(self.progress_dir, ignore_errors=True)
        return nullcontext() if self.world == 1 else self.state.main_process_first()

    # ---------------------------------------------------------------------------------------------------- the split

    def share(
        self, missing: Sequence[T], phase: str, key: Callable[[T], str] = str, *, unit: str = "entry", show: bool = True
    ) -> list[T]:
        """This process's part of a phase's missing entries (see the module docstring), in their order. A process
        with nothing to do says so at once; the main process then shows the others' progress until they are done."""
        if self.world == 1:
            return list(missing)
        order = sorted(range(len(missing)), key=lambda i: key(missing[i]))
        mine = sorted(order[self.rank :: self.world])
        if missing and not mine:
            self._count(phase, 0, done=True)
            if self.main:
                bar = ProgressLines(len(missing), label=phase, unit=unit, enabled=show)
                self._show_until_done(bar, phase)
                bar.close()
        return [missing[i] for i in mine]

    def progress(
        self, items: Iterable[T], total: int | None = None, *, desc: str, unit: str, disable: bool = False
    ) -> Iterator[T]:
        """Each item of this process's share, while the phase's progress shows (progress_lines.py: a bar on a
        terminal, else complete lines): on the main process with the total of every process, and it returns only
        when every process is done with the phase."""
        bar = ProgressLines(total or 0, label=desc, unit=unit, enabled=not disable and self.main)
        if self.world == 1:
            yield from bar.each(items)
            return
        done, last = 0, time.monotonic()
        for item in items:
            yield item
            done += 1
            if time.monotonic() - last >= PROGRESS_INTERVAL_S:
                self._count(desc, done, done=False)
                last = time.monotonic()
                if self.main:
                    bar.update_to(self._read(desc)[0])
        self._count(desc, done, done=True)
        if self.main:
            self._show_until_done(bar, desc)
        bar.close()

    def _count(self, phase: str, n: int, *, done: bool) -> None:
        write_text_atomic(self.progress_dir / f"{phase}.{self.rank}", f"{n} {int(done)}", durable=False)

    def _read(self, phase: str) -> tuple[int, int]:
        """(entries encoded by every process so far, processes done)."""
        total = finished = 0
        for rank in range(self.world):
            try:
                n, done = (self.progress_dir / f"{phase}.{rank}").read_text().split()
            except (OSError, ValueError):
                continue
            total, finished = total + int(n), finished + int(done)
        return total, finished

    def _show_until_done(self, bar: ProgressLines, phase: str) -> None:
        """The main process's progress until every process has counted itself done (a process that dies ends the
        whole launch: accelerate's launcher stops the others)."""
        while True:
            n, finished = self._read(phase)
            bar.update_to(n)
            if finished == self.world:
                break
            time.sleep(PROGRESS_INTERVAL_S / 4)

    # ------------------------------------------------------------------------------------------------------- merging

    def sync(self, build: Any, plans: Sequence[Any], *, final: bool = False) -> None:
        """Barrier between phases. Every process then holds every process's decode failures, in plan order within
        a phase as one process records them (the report lists them in that order); `final`: the main process also
        gets the (bytes, sha256) of every entry the others wrote (its indexes need not rehash them) and the total of
        bytes written, and records where this build encoded (`record_where`)."""
        if self.world > 1:
            self._merge(build, plans, final=final)
        if final:
            self.record_where(build)
        self.wait()

    def _merge(self, build: Any, plans: Sequence[Any], *, final: bool) -> None:
        from accelerate.utils import gather_object

        position = {id(p.sample): i for i, p in enumerate(plans)}
        new = [(position[k], issue) for k, issue in build.failed.items() if position[k] not in self._merged]
        merged = {i: issue for i, issue in sorted(gather_object(new), key=lambda pair: pair[0])}
        old = {k: issue for k, issue in build.failed.items() if position[k] in self._merged}
        build.failed.clear()
        build.failed.update(old)
        build.failed.update({id(plans[i].sample): issue for i, issue in merged.items()})
        self._merged |= set(merged)
        if final:
            for written in gather_object([build.written]):
                for root, entries in written.items():
                    build.written.setdefault(root, {}).update(entries)
            build.stats.bytes = sum(gather_object([build.stats.bytes]))
            if self.main:
                shutil.rmtree(self.progress_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ where encoded

    def record_where(self, build: Any) -> None:
        """One line in `<cache_dir>/builds.jsonl` for a build that encoded entries: when it finished, each phase's
        misses, the encoders' dtype, torch, and each process's device and torch thread count. Entry keys name what
        is encoded, never where, so that a cache is reused on any machine; the last bits an encoder writes can
        depend on where (docs/REPRODUCIBILITY.md), and these lines say where each build ran. A build with nothing
        to encode adds no line (and imports no torch). Not counted in the bytes written: that is the cache's."""
        encoded = any(build.stats.misses.values()) or any(build.written.values())  # the main's: every process's
        if self.world == 1 and not encoded:
            return
        import torch

        here = _where_this_process_encodes()
        if self.world > 1:  # every process gathers (only the main knows what all wrote, e.g. i2v validation entries)
            from accelerate.utils import gather_object

            processes = gather_object([here])
        else:
            processes = [here]
        if not (self.main and encoded):
            return
        line = {
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "misses": dict(build.stats.misses),
            "dtype": build.dtype_name,
            "torch": torch.__version__,
            "processes": processes,
        }
        path = Path(build.layout.root) / BUILDS_FILE
        before = path.read_text() if path.is_file() else ""
        write_text_atomic(path, before + json.dumps(line) + "\n")


def _where_this_process_encodes() -> dict[str, Any]:
    """This process's device (a GPU's index and name; on the CPU, the instruction set torch's kernels use) and torch's
    CPU thread count: what the encoders' last bits can depend on."""
    import torch

    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        device = f"cuda:{index} {torch.cuda.get_device_name(index)}"
    else:
        device = f"cpu {torch.backends.cpu.get_cpu_capability()}"
    return {"device": device, "threads": torch.get_num_threads()}
