"""The run page's cost to training (issue 16): the step time of `hvtune train` with the page being polled every
second, against without it (budget: within 2%).

    python benchmarks/bench_page.py [--quick] [--rounds R] [--steps N] [--warmup W] [--out PATH]

The same measurement as bench_train.py's step ratio (its `_trainer_run`: `hvtune.trainer.train` on the tiny demo
model, validation and checkpoints off, step times from `logs/loss.jsonl`, the first W steps of each run skipped),
in alternating rounds (plain, paged; then paged, plain; ...) so machine load hits both. "Paged": a `hvtune serve`
process on the run's output folder, and a client that does what the open page does each second: GET /api/state
(status.json, the video and download listings) and /api/loss from its last offset. Both modes include the trainer's
own status.json writes (they are part of `hvtune train`). Reported: the ratio of the median step times, and the
number of polls answered. Writes benchmarks/results/page.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_train import _env, _hvtune, _run, _trainer_run  # noqa: E402  (sets up sys.path for hvtune)

BUDGET = 1.02


class Poller:
    """`hvtune serve OUT` plus a client polling it every second as the page does."""

    def __init__(self, out: Path):
        self.proc = subprocess.Popen(
            _hvtune("serve", str(out), "--port", "0"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(),
        )
        line = self.proc.stdout.readline()
        while line and not line.startswith("run page:"):  # after the "does not exist yet" notice
            line = self.proc.stdout.readline()
        match = re.search(r"http://\S+", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"hvtune serve did not start: {line}{self.proc.stdout.read()}")
        self.url = match.group(0).rstrip("/")
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def _poll(self) -> None:
        offset, inode = 0, ""
        while not self._stop.is_set():
            started = time.monotonic()
            self._get("/api/state?run=0")
            loss = self._get(f"/api/loss?run=0&offset={offset}&inode={inode}")
            offset, inode = loss["offset"], loss["inode"] or ""
            self.polls += 1
            self._stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))

    def close(self) -> int:
        self._stop.set()
        self._thread.join()
        self.proc.terminate()
        self.proc.wait(timeout=10)
        return self.polls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int, help="timed steps per run")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--out", default=str(HERE / "results" / "page.json"))
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 8)
    steps = args.steps or (3 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)

    from hvtune.demo import write_demo_project

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="hvtune-bench-page-"))
    config = write_demo_project(work / "demo", clips=2 if args.quick else 8, seed=0, steps=40)
    _run(_hvtune("cache", "--config", str(config)))
    plain, paged, runs, polls = [], [], [], 0
    for r in range(rounds):
        for mode in ("plain", "paged") if r % 2 == 0 else ("paged", "plain"):
            out = work / f"run-{r}-{mode}"
            poller = Poller(out) if mode == "paged" else None
            try:
                times, _ = _trainer_run(config, out, warmup + steps)
            finally:
                answered = poller.close() if poller else 0
            polls += answered
            (paged if mode == "paged" else plain).extend(times[warmup:])
            median = statistics.median(times[warmup:])
            runs.append({"round": r, "mode": mode, "median_step_s": round(median, 4), "polls": answered})
            print(f"  round {r} {mode:5s}: median step {median:.3f} s, {answered} polls", flush=True)
    ratio = statistics.median(paged) / statistics.median(plain)
    verdict = "met" if ratio <= BUDGET else "MISSED"
    doc = {
        "benchmark": "page",
        "command": "python benchmarks/bench_page.py" + (" --quick" if args.quick else ""),
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
        | {"platform": platform.platform(), "python": platform.python_version()},
        "rounds": rounds,
        "timed_steps_per_run": steps,
        "warmup_steps_skipped": warmup,
        "plain_median_step_s": round(statistics.median(plain), 4),
        "paged_median_step_s": round(statistics.median(paged), 4),
        "ratio": round(ratio, 4),
        "budget": f"<= {BUDGET}",
        "verdict": verdict,
        "polls_answered": polls,
        "runs": runs,
        "total_s": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(
        f"\nstep with the page polled / without: {ratio:.4f} (budget <= {BUDGET}: {verdict}); median step "
        f"{doc['paged_median_step_s']:.3f} s vs {doc['plain_median_step_s']:.3f} s; {polls} polls answered"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
