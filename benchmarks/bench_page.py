"""The run page's cost to training (issue 16): the step time of `hvtune train` with the page being polled every
second, against without it (budget: within 2%).

    PYTHONPATH=app python benchmarks/bench_page.py [--quick] [--rounds R] [--steps N] [--warmup W] [--out PATH]

The same measurement as bench_train.py's step ratio (`common.trainer_run`: `hvtune.trainer.train` on the tiny demo
model, validation and checkpoints off, step times from `logs/loss.jsonl`, the first W steps of each run skipped),
in alternating rounds (plain, paged; then paged, plain; ...) so machine load hits both. "Paged": a `hvtune serve`
process on the run's output folder, and a client that does what the open page does each second: GET /api/state
(status.json, the video and download listings) and /api/loss from its last offset, with the page's token. Both
modes include the trainer's own status.json writes (they are part of `hvtune train`). Reported: the ratio of the
median step times, and the number of polls answered. Writes benchmarks/results/page.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

from common import RESULTS, hvtune_command, machine, run, subprocess_env, trainer_run, write_result

BUDGET = 1.02


class Poller:
    """`hvtune serve OUT` plus a client polling it every second as the page does."""

    def __init__(self, out: Path):
        self.proc = subprocess.Popen(
            hvtune_command("serve", str(out), "--port", "0"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=subprocess_env(),
        )
        line = self.proc.stdout.readline()
        while line and not line.startswith("run page:"):  # after the "does not exist yet" notice
            line = self.proc.stdout.readline()
        match = re.search(r"http://\S+", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"hvtune serve did not start: {line}{self.proc.stdout.read()}")
        base, _, query = match.group(0).partition("?")
        self.url = base.rstrip("/")
        self.token = urllib.parse.unquote(query.removeprefix("token="))  # every page has one (sent as Bearer)
        self.polls = 0
        self.cpu_start, self.wall_start = self.cpu_seconds(), time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _get(self, path: str) -> dict:
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def _poll(self) -> None:
        offset, inode, stride = 0, "", ""
        while not self._stop.is_set():
            started = time.monotonic()
            self._get("/api/state?run=0")
            loss = self._get(f"/api/loss?run=0&offset={offset}&inode={inode}&stride={stride}")
            offset, inode, stride = loss["offset"], loss["inode"] or "", loss["stride"] or ""
            self.polls += 1
            self._stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))

    def cpu_seconds(self) -> float:
        """CPU time the page server has used (user + system, from /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> tuple[int, float]:
        """Polls answered, and the server's CPU share of one core while it was polled (start-up excluded)."""
        self._stop.set()
        self._thread.join()
        share = (self.cpu_seconds() - self.cpu_start) / max(1e-9, time.monotonic() - self.wall_start)
        self.proc.terminate()
        self.proc.wait(timeout=10)
        return self.polls, share


def status_write_ms(work: Path, writes: int = 200) -> float:
    """Median milliseconds of one status.json write as the trainer does it (with the run record in it)."""
    from hvtune.output.status import RunStatus

    status = RunStatus(work / "status-bench")
    status.data["record"] = {"config": {f"key_{i}": "value" * 4 for i in range(150)}}
    times = []
    for step in range(writes):
        status.data["step"] = step
        t0 = time.perf_counter()
        status.phase("training")
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure_rounds(config: Path, work: Path, rounds: int, warmup: int, steps: int) -> tuple:
    """Alternating rounds of plain and paged runs: (plain step times, paged step times, the runs, polls answered,
    the page server's CPU shares)."""
    plain, paged, runs, polls, shares = [], [], [], 0, []
    for r in range(rounds):
        for mode in ("plain", "paged") if r % 2 == 0 else ("paged", "plain"):
            out = work / f"run-{r}-{mode}"
            poller = Poller(out) if mode == "paged" else None
            try:
                times, _ = trainer_run(config, out, warmup + steps)
            finally:
                answered, share = poller.close() if poller else (0, None)
            polls += answered
            if share is not None:
                shares.append(share)
            (paged if mode == "paged" else plain).extend(times[warmup:])
            median = statistics.median(times[warmup:])
            runs.append({"round": r, "mode": mode, "median_step_s": round(median, 4), "polls": answered})
            if share is not None:
                runs[-1]["page_cpu_share"] = round(share, 4)
            print(f"  round {r} {mode:5s}: median step {median:.3f} s, {answered} polls", flush=True)
    return plain, paged, runs, polls, shares


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int, help="timed steps per run")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--out", default=str(RESULTS / "page.json"))
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 8)
    steps = args.steps or (3 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)

    from hvtune.testing.demo import write_demo_project

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="hvtune-bench-page-"))
    config = write_demo_project(work / "demo", clips=2 if args.quick else 8, seed=0, steps=40)
    run(hvtune_command("cache", "--config", str(config)))
    plain, paged, runs, polls, shares = measure_rounds(config, work, rounds, warmup, steps)
    ratio = statistics.median(paged) / statistics.median(plain)
    write_ms = status_write_ms(work)
    shutil.rmtree(work, ignore_errors=True)
    verdict = "met" if ratio <= BUDGET else "MISSED"
    doc = {
        "benchmark": "page",
        "command": " ".join(["python benchmarks/bench_page.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "rounds": rounds,
        "timed_steps_per_run": steps,
        "warmup_steps_skipped": warmup,
        "plain_median_step_s": round(statistics.median(plain), 4),
        "paged_median_step_s": round(statistics.median(paged), 4),
        "ratio": round(ratio, 4),
        "budget": f"<= {BUDGET}",
        "verdict": verdict,
        "polls_answered": polls,
        # load-independent bounds: the page server's CPU while polled every second (share of one core), and one
        # status.json write of the trainer (at most one a second)
        "page_cpu_share_of_one_core_median": round(statistics.median(shares), 4),
        "status_write_ms_median": round(write_ms, 3),
        "runs": runs,
        "total_s": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    write_result(out, doc)
    print(
        f"\nstep with the page polled / without: {ratio:.4f} (budget <= {BUDGET}: {verdict}); median step "
        f"{doc['paged_median_step_s']:.3f} s vs {doc['plain_median_step_s']:.3f} s; {polls} polls answered"
    )
    print(
        f"page server CPU while polled: {100 * doc['page_cpu_share_of_one_core_median']:.2f}% of one core; "
        f"one status.json write: {write_ms:.2f} ms (at most one a second)"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
