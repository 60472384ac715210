"""How long `hvtune plan` takes to find the dataset's largest bucket: the cache build's scan of N clips, per 1,000.

    PYTHONPATH=app python benchmarks/bench_plan_scan.py [--clips 1000] [--frames 61] [--out PATH]

Writes N h264 clips of moving noise (about 2.5 MB each at 848x480x61, the size of a real 480p clip; copies of 6
distinct ones: 848x480, 480x848, 640x480, 1280x720 ...; each probe is independent, so copies cost what distinct clips
do) with a caption each, then times, each once in this process:

1. plan's scan (`plan.dataset.scan_clips`) with no probe index: every clip probed (container metadata, every packet's
   timestamp, the first frame decoded), none hashed;
2. the cache build's scan (`data.datasets.scan` with a fresh `ProbeIndex`): the same probe plus a sha256 of every
   file, for comparison; it saves the probe index as a build does;
3. plan's scan again with that probe index present: a known, unchanged clip costs a stat;
4. `plan.dataset.planned_data`'s work for the largest bucket, end to end, on the same clips (as 3).

The clips were just written, so they are in the page cache: a first read from a cold disk or a network mount adds the
time to read each file once (plan reads every packet header; the build also hashes every byte).
Writes benchmarks/results/plan_scan.json (or --out) and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import RESULTS, machine, write_result

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SIZES = [(848, 480), (480, 848), (640, 480), (480, 640), (1280, 720), (512, 512)]


def write_noise_clip(path: Path, frames: int, size: tuple[int, int]) -> Path:
    """h264 of smooth noise that moves: compresses like filmed video, not like a flat test pattern."""
    import av
    import numpy as np

    width, height = size
    rng = np.random.default_rng(0)
    field = rng.integers(0, 256, (height // 8 + frames, width // 8 + frames, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "20", "preset": "ultrafast"}
        for i in range(frames):
            small = field[i : i + height // 8, i : i + width // 8]
            frame = np.repeat(np.repeat(small, 8, axis=0), 8, axis=1) | rng.integers(
                0, 32, (height, width, 3), np.uint8
            )
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode(None))
    return path


def write_clips(folder: Path, n: int, frames: int) -> int:
    """n clips with captions in `folder`; returns the bytes of one pass over them."""
    folder.mkdir(parents=True)
    base = [write_noise_clip(folder / f"base_{i}.mp4", frames, s) for i, s in enumerate(SIZES)]
    for i in range(n):
        shutil.copyfile(base[i % len(base)], folder / f"clip_{i:05d}.mp4")
        (folder / f"clip_{i:05d}.txt").write_text(f"a grey square number {i} drifting slowly")
    for p in base:
        p.unlink()
    return sum(p.stat().st_size for p in folder.glob("*.mp4"))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=61)
    parser.add_argument("--out", type=Path, default=RESULTS / "plan_scan.json")
    args = parser.parse_args()

    from hvtune.cache.layout import CacheLayout
    from hvtune.config.settings import load_config
    from hvtune.data.datasets import scan
    from hvtune.data.probe import ProbeIndex
    from hvtune.plan.dataset import planned_data, scan_clips

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        nbytes = write_clips(root / "clips", args.clips, args.frames)
        backend = [
            {"id": "clips", "dataset_type": "video", "instance_data_dir": str(root / "clips"), "resolution": 480,
             "caption_strategy": "textfile", "video": {"num_frames": args.frames}},
            {"id": "text", "dataset_type": "text_embeds", "default": True},
        ]  # fmt: skip
        (root / "mdb.json").write_text(json.dumps(backend))
        config = {"cache_dir": str(root / "cache"), "data_backend_config": str(root / "mdb.json")}
        (root / "config.json").write_text(json.dumps(config))
        resolved = load_config(root / "config.json", env={})

        plan_s, data = timed(lambda: scan_clips(resolved))
        index = ProbeIndex(CacheLayout(resolved).probe_index_path)
        build_s, result = timed(lambda: scan(resolved, probe_index=index, progress=False))
        index.path.parent.mkdir(parents=True, exist_ok=True)
        index.save()
        indexed_s, indexed = timed(lambda: scan_clips(resolved))
        planned_s, planned = timed(lambda: planned_data(resolved))
    assert len(data.samples) == len(result.samples) == len(indexed.samples) == args.clips
    assert {s.bucket for s in data.samples} == {s.bucket for s in result.samples}
    per_1000 = 1000 / args.clips
    doc = {
        "clips": args.clips,
        "frames": args.frames,
        "clip_mb": round(nbytes / args.clips / 1e6, 3),
        "buckets": sorted({"x".join(map(str, s.bucket)) for s in data.samples}),
        "largest_bucket": "x".join(map(str, planned.largest_bucket)),
        "seconds_per_1000": {
            "plan_scan_no_index": round(plan_s * per_1000, 2),
            "build_scan_hashing": round(build_s * per_1000, 2),
            "plan_scan_with_probe_index": round(indexed_s * per_1000, 2),
            "planned_data_with_probe_index": round(planned_s * per_1000, 2),
        },
        "machine": machine(),
    }
    write_result(args.out, doc)
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
