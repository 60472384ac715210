"""Cache prebuild performance: decode+resize throughput, peak memory as the dataset grows, fully cached rerun speed.

    PYTHONPATH=app python benchmarks/bench_cache.py [--quick] [--out PATH]

1. Decode + resize (media.read_video, PyAV + torch bicubic): 480p (848x480) h264 clips, frames per second for the
   native 848x480 bucket (decode + RGB conversion only) and for the 624x368 bucket (resolution 360: decode + resize +
   centre crop).
2. Peak RSS of a whole `build_cache` (tiny model as encoders, synthetic 128x80 clips, one caption for all so the
   text stage stays constant) for 10 clips and for 200 clips, each in a fresh process (`ru_maxrss` of that process).
   The builder streams: one clip decoded ahead, never all of them, so the two should be within 10%.
3. Fully cached rerun: the same process runs `build_cache` again on the 200-clip dataset with everything cached
   (ratio of the two in-process times; the first includes the lazy imports of diffusers/transformers it triggers),
   and a fresh `python -m hvtune cache` on the cached dataset against the fresh process that built it (wall times,
   Python start and imports included on both sides: what a user waits for).

The tiny model's encoders are far cheaper than the real ones (a 7B text encoder, a 1.3B VAE), so the rerun ratio here is
a lower bound: a rerun's cost does not depend on the encoders, a first run's grows with them.
Writes benchmarks/results/cache.json (or --out) and prints the figures. Default run: about 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_cache_project

HERE = Path(__file__).resolve().parent
APP = HERE.parent / "app"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _encodable(model: Path) -> Path:
    """The tiny model's VAE must be able to encode: its last block needs >= 2 * latent_channels (64). Until
    tiny_model.py writes such a VAE, swap in one (same classes, seeded). No-op once tiny_model.py is fixed."""
    cfg = json.loads((model / "vae" / "config.json").read_text())
    if cfg["block_out_channels"][-1] >= 2 * cfg["latent_channels"]:
        return model
    import torch
    from diffusers import AutoencoderKLHunyuanVideo15

    torch.manual_seed(4)
    kwargs = {k: v for k, v in cfg.items() if not k.startswith("_")}
    kwargs["block_out_channels"] = [*cfg["block_out_channels"][:-1], 2 * cfg["latent_channels"]]
    shutil.rmtree(model / "vae")
    AutoencoderKLHunyuanVideo15(**kwargs).eval().save_pretrained(model / "vae")
    return model


# --------------------------------------------------------------------------------------------------------- child


def child(config: str) -> None:
    """Runs in a fresh process: build, then rebuild fully cached; prints one JSON line."""
    from hvtune.cache.build import build_cache
    from hvtune.config.settings import load_config

    resolved = load_config(config, env={})
    t0 = time.perf_counter()
    first = build_cache(resolved, progress=False)
    t1 = time.perf_counter()
    again = build_cache(resolved, progress=False)
    t2 = time.perf_counter()
    print(
        json.dumps(
            {
                "clips": first.total_used,
                "first_s": round(t1 - t0, 3),
                "rerun_s": round(t2 - t1, 4),
                "rerun_misses": again.misses,
                "first_misses": first.misses,
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    )


def _run_child(config: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(APP)}
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(config)], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - t0, 2)  # a fresh process: imports + first build + cached rebuild
    return result


# ---------------------------------------------------------------------------------------------------------- parts


def bench_decode(work: Path, clips: int, frames: int) -> dict:
    from hvtune.data.media import probe_video, read_video
    from hvtune.testing.synth import write_synthetic_dataset

    paths = write_synthetic_dataset(work / "480p", clips=clips, seed=0, size=(848, 480), num_frames=frames, fps=24)
    results = {}
    for label, size in (("decode_848x480", (848, 480)), ("decode_resize_624x368", (624, 368))):
        n = 0
        t0 = time.perf_counter()
        for p in paths:
            info = probe_video(p)
            out = read_video(p, num_frames=frames, size=size, frame_rate=None, seed=0, key=p.name, info=info)
            n += out.shape[0]
        dt = time.perf_counter() - t0
        results[label] = {
            "bucket": list(size),
            "frames": n,
            "seconds": round(dt, 3),
            "frames_per_s": round(n / dt, 1),
            "clips_per_s": round(len(paths) / dt, 2),
        }
    return {"source": "848x480 h264 yuv420p, synthetic", "clips": clips, "frames_per_clip": frames, **results}


def bench_build(work: Path, model: Path, small: int, large: int) -> dict:
    from hvtune.testing.synth import write_synthetic_dataset

    all_clips = work / "clips_all"
    paths = write_synthetic_dataset(all_clips, clips=large, seed=1, size=(128, 80), num_frames=9, fps=24)
    runs = {}
    for n in (small, large):
        clips = work / f"clips_{n}"
        clips.mkdir()
        for p in paths[:n]:
            os.link(p, clips / p.name)
            os.link(p.with_suffix(".txt"), clips / p.with_suffix(".txt").name)
        root = work / f"project_{n}"
        root.mkdir()
        config = write_cache_project(
            root,
            model,
            clips,
            dataset={"caption_strategy": "instanceprompt", "instance_prompt": "a shape moving over a background"},
        )
        runs[n] = _run_child(config)
        runs[n]["config"] = config
    big = runs[large]
    env = {**os.environ, "PYTHONPATH": str(APP)}
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "hvtune", "cache", "--config", str(big["config"])],
        env=env,
        capture_output=True,
        check=True,
    )
    cli_rerun = time.perf_counter() - t0
    rss_small, rss_large = runs[small]["peak_rss_mb"], big["peak_rss_mb"]
    return {
        "clip": "128x80 h264, 9 frames, bucket 128x80@9, tiny model encoders, CPU",
        "peak_rss_mb": {str(small): rss_small, str(large): rss_large},
        "peak_rss_growth_pct": round(100 * (rss_large - rss_small) / rss_small, 1),
        "first_run_s": {str(small): runs[small]["first_s"], str(large): big["first_s"]},
        "first_run_clips_per_s": round(large / big["first_s"], 2),
        "cached_rerun_s_in_process": {str(small): runs[small]["rerun_s"], str(large): big["rerun_s"]},
        "cached_rerun_speedup_in_process": round(big["first_s"] / big["rerun_s"], 1),
        "first_run_process_wall_s": big["wall_s"],
        "cached_rerun_cli_wall_s": round(cli_rerun, 2),
        "cached_rerun_speedup_cli_wall": round(big["wall_s"] / cli_rerun, 1),
        "rerun_misses": big["rerun_misses"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smallest sizes (smoke test), seconds")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cache.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0

    from hvtune.files import write_text_atomic
    from hvtune.testing.tiny_model import write_tiny_model

    decode_clips, decode_frames = (1, 9) if args.quick else (6, 61)
    small, large = (2, 6) if args.quick else (10, 200)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        work = Path(tmp)
        model = _encodable(write_tiny_model(work / "tiny-t2v", task="t2v", seed=0))
        decode = bench_decode(work, decode_clips, decode_frames)
        build = bench_build(work, model, small, large)
    result = {
        "benchmark": "cache",
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "decode": decode,
        "build": build,
        "total_s": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")

    d, b = decode, build
    n = d["decode_848x480"]
    print(f"decode 480p:        {n['frames_per_s']} frames/s ({n['clips_per_s']} clips/s)")
    r = d["decode_resize_624x368"]
    print(f"decode+resize:      {r['frames_per_s']} frames/s to 624x368 ({r['clips_per_s']} clips/s)")
    print(f"peak RSS:           {b['peak_rss_mb']} MB (growth {b['peak_rss_growth_pct']}%)")
    print(f"first run:          {b['first_run_s']} s")
    print(f"cached rerun:       {b['cached_rerun_s_in_process']} s in process, x{b['cached_rerun_speedup_in_process']}")
    print(
        f"cached rerun (CLI): {b['cached_rerun_cli_wall_s']} s wall vs {b['first_run_process_wall_s']} s first,"
        f" x{b['cached_rerun_speedup_cli_wall']}"
    )
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
