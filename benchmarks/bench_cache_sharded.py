"""The cost of a sharded `hvtune cache` (issue 17): the first build of 200 tiny clips with 2 processes of 1 thread each
against 1 process of 2 threads, on the same cores.

    PYTHONPATH=app python benchmarks/bench_cache_sharded.py [--clips 200] [--repeats 1] [--out PATH]

Each build is a fresh command in a fresh cache folder, timed from the outside as a user waits for it (Python start,
imports, the scan, every phase, the manifest): `OMP_NUM_THREADS=2 python -m hvtune cache` against
`OMP_NUM_THREADS=1 accelerate launch --num_processes 2 -m hvtune cache`. The model is the tiny one (hvtune.testing),
the clips synthetic 128x80 x 9 frames with a caption each, so every phase (text, VAE) is split. With `--repeats N`
the two builds alternate N times and the fastest of each counts (the machine may be shared).

On a 2-core CPU sharding cannot be faster than threads: the ratio is its cost (the second process's start and
imports, the barriers, the uneven last entries). On an N-GPU box each process has a GPU of its own and the ratio
should approach 1/N. Writes benchmarks/results/cache_sharded.json (or --out) and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_cache_project

HERE = Path(__file__).resolve().parent
APP = HERE.parent / "app"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(config: Path, processes: int, threads: int) -> float:
    """Wall seconds of a first build in a fresh cache folder."""
    shutil.rmtree(config.parent / "cache", ignore_errors=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(APP),
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [str(BIN / "python"), "-m", "hvtune", "cache", "--config", str(config)]
    if processes > 1:
        launch = [f"--num_processes={processes}", "--num_machines=1", "--multi_gpu", "--mixed_precision=no"]
        launch += ["--dynamo_backend=no", f"--main_process_port={_free_port()}"]
        command = [str(BIN / "accelerate"), "launch", *launch, *command[1:]]
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")
    return seconds


def bench(work: Path, clips: int, repeats: int) -> dict:
    from hvtune.testing.synth import write_synthetic_dataset
    from hvtune.testing.tiny_model import write_tiny_model

    model = write_tiny_model(work / "tiny-t2v", task="t2v", seed=0)
    write_synthetic_dataset(work / "clips", clips=clips, seed=1, size=(128, 80), num_frames=9, fps=24)
    config = write_cache_project(work, model, work / "clips")
    one, two = [], []
    for _ in range(repeats):
        one.append(_build(config, processes=1, threads=2))
        two.append(_build(config, processes=2, threads=1))
        print(f"  1 process x 2 threads {one[-1]:.1f} s, 2 processes x 1 thread {two[-1]:.1f} s", flush=True)
    return {
        "clips": clips,
        "repeats": repeats,
        "one_process_two_threads_s": min(one),
        "two_processes_one_thread_s": min(two),
        "ratio": min(two) / min(one),
        "all_s": {"one_process_two_threads": one, "two_processes_one_thread": two},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cache_sharded.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-cache-sharded-") as tmp:
        result = bench(Path(tmp), args.clips, args.repeats)
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"first build of {result['clips']} clips: 1 process x 2 threads {result['one_process_two_threads_s']:.1f} s, "
        f"2 processes x 1 thread {result['two_processes_one_thread_s']:.1f} s, ratio {result['ratio']:.2f} "
        f"(written to {args.out})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
