"""Training budgets on the tiny model (issue 7, item 2): step overhead, start-up, peak RSS, fully cached `hvtune cache`.

    PYTHONPATH=app python benchmarks/bench_train.py [--quick] [--out PATH] [--rounds R] [--steps N] [--warmup W]
                                                    [--cache-clips 200] [--cache-first-limit 240]

Everything runs on the tiny random model of `hvtune.testing.demo.write_demo_project` in a temporary folder; its cache
is built once with `hvtune cache`. Training uses the demo config with validation off and checkpointing off
(`checkpointing_steps` far beyond the run), so only the training step is measured.

1. Steady-state step ratio. `hvtune.trainer.train` (the loop of `hvtune train`: accelerate's prepared model and
   optimizer, LR schedule, loss log, TensorBoard, progress bar, status) against a bare loop around the trainer's own
   `training_step` on the same batches: transformer from `hvtune.model.registry`, base prep + LoRA + optimizer from
   `hvtune.train.base_model`, `.lora`, `.optim`, batches from `hvtune.train.batches.plan_epoch`/`load_batch`, the
   schedule from
   `hvtune.train.objective.schedule_options`, under a plain `accelerate.Accelerator`; no LR schedule, no logging, no
   checkpointing. Both run in this one process, alternating in rounds (A B, then B A,
   ...) so machine load hits both; the first W steps of every run are skipped; trainer step times are the `seconds` of
   `logs/loss.jsonl`, bare step times are measured the same way (end of one step to the end of the next, batch loading
   included). Reported: the ratio of the medians (budget <= 1.10). The first losses of both are compared as a check
   that they ran the same batches.
2. Start-up: `python -m hvtune train` as a subprocess; from just before the process starts to the first line of
   `loss.jsonl` (polled every 20 ms) (budget <= 10 s). Split into "before the loop" (that time minus step 1's own
   `seconds`) and step 1. Alternating with it, the import floor: a process that only imports torch, accelerate, peft
   and the diffusers transformer class, which any trainer built on them pays; start-up minus floor is the rest (hvtune's
   setup, loading the weights, step 1), reported run by run. With `python -X importtime`, the slowest top-level
   imports of what `train` imports.
3. Peak RSS of that same training process (`/usr/bin/time -v`, else `ru_maxrss` of the children) (budget <= 1.0 GB).
4. `hvtune cache` on a fully cached dataset: synthetic 64x48 clips (9 frames), cached once, then the whole
   `python -m hvtune cache` process timed again (budget < 5 s for 200 clips). If the first build does not finish within
   `--cache-first-limit` seconds the rerun is timed on the clips it got through and the result says so.

Writes benchmarks/results/train.json (or --out) and prints a table. `--quick`: the smallest sizes (the test uses it).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    NO_SIDE_WORK,
    RESULTS,
    hvtune_command,
    loss_rows,
    machine,
    run,
    step_accelerator,
    subprocess_env,
    trainer_run,
    write_cache_project,
    write_result,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BUDGETS = {"step_ratio": 1.10, "start_to_first_step_s": 10.0, "peak_rss_gb": 1.0, "cached_rerun_200_s": 5.0}


# ------------------------------------------------------------------------------------------------------ 1. step ratio


def _bare_run(config: Path, steps: int) -> tuple[list[float], list[float]]:
    """The same setup and the trainer's own `training_step` on the same batches, with nothing around it."""
    import torch

    from hvtune.cache.manifest import load_manifest
    from hvtune.config.settings import load_config
    from hvtune.model.registry import load_scheduler, load_transformer, resolve_model
    from hvtune.train.base_model import base_dtype, prepare_base
    from hvtune.train.batches import load_batch, plan_epoch, text_entry
    from hvtune.train.lora import add_lora
    from hvtune.train.objective import counter_seed, schedule_options
    from hvtune.train.optim import build_optimizer
    from hvtune.train.step import training_step

    resolved = load_config(config, env={}, argv=[*NO_SIDE_WORK, f"--max_train_steps={steps}"])
    cfg = resolved.train
    manifest = load_manifest(resolved)
    paths = resolve_model(cfg, ["transformer", "scheduler"])
    transformer = load_transformer(paths, dtype=base_dtype(cfg))
    transformer.requires_grad_(False)
    prepare_base(transformer, cfg, "cpu")
    torch.manual_seed(counter_seed(cfg.seed, purpose="lora_init"))
    add_lora(transformer, cfg)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    step_args = dict(
        rank=0,
        empty=text_entry(manifest, manifest.empty_prompt_key),
        image_embed_shape=(0, transformer.config.image_embed_dim),  # as the trainer: no image tokens for t2v
        device="cpu",
        schedule=schedule_options(cfg, dict(load_scheduler(paths).config) if cfg.shift == 0 else None),
    )
    times, losses, epoch = [], [], 0
    started = time.time()
    with step_accelerator(cfg.mixed_precision, cpu=True) as accelerator:
        while len(times) < steps:
            plan = plan_epoch(manifest, global_batch_size=cfg.train_batch_size, seed=cfg.seed, epoch=epoch)
            for index, items in enumerate(plan):
                batch = load_batch(manifest, items)
                loss = training_step(
                    accelerator, transformer, optimizer, params, batch, cfg, epoch=epoch, index=index, **step_args
                )
                now = time.time()
                times.append(now - started)
                losses.append(loss.item())
                started = now
                if len(times) >= steps:
                    break
            epoch += 1
    return times, losses


def measure_ratio(config: Path, work: Path, rounds: int, warmup: int, steps: int) -> dict:
    import torch

    trainer_steps, bare_steps, runs = [], [], []
    first_losses = {}
    for r in range(rounds):
        order = ("trainer", "bare") if r % 2 == 0 else ("bare", "trainer")
        for which in order:
            t0 = time.perf_counter()
            if which == "trainer":
                times, losses = trainer_run(config, work / f"ratio-out-{r}", warmup + steps)
                trainer_steps += times[warmup:]
            else:
                times, losses = _bare_run(config, warmup + steps)
                bare_steps += times[warmup:]
            first_losses.setdefault(which, losses[: warmup + steps])
            runs.append(
                {
                    "round": r,
                    "loop": which,
                    "run_wall_s": round(time.perf_counter() - t0, 2),
                    "median_step_s": round(statistics.median(times[warmup:]), 4),
                    "step_s": [round(t, 4) for t in times],
                }
            )
            print(f"  round {r} {which:7s}: median step {runs[-1]['median_step_s']:.3f} s", flush=True)
    t_med, b_med = statistics.median(trainer_steps), statistics.median(bare_steps)
    diff = max(abs(a - b) for a, b in zip(first_losses["trainer"], first_losses["bare"], strict=True))
    return {
        "rounds": rounds,
        "warmup_steps_skipped": warmup,
        "timed_steps_per_run": steps,
        "torch_threads": torch.get_num_threads(),
        "trainer_median_step_s": round(t_med, 4),
        "bare_median_step_s": round(b_med, 4),
        "ratio": round(t_med / b_med, 3),
        "trainer_mean_step_s": round(statistics.mean(trainer_steps), 4),
        "bare_mean_step_s": round(statistics.mean(bare_steps), 4),
        "ratio_of_means": round(statistics.mean(trainer_steps) / statistics.mean(bare_steps), 3),
        "same_batches_max_loss_diff": diff,
        "runs": runs,
    }


# -------------------------------------------------------------------------------------------- 2-3. start-up and RSS


def measure_startup(config: Path, out: Path, steps: int) -> dict:
    """One whole `hvtune train` process: start to the first loss line, and its peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    timev = "/usr/bin/time" if Path("/usr/bin/time").exists() else None
    cmd = hvtune_command(
        "train", "--config", str(config), *NO_SIDE_WORK, f"--max_train_steps={steps}", f"--output_dir={out}"
    )
    if timev:
        cmd = [timev, "-v", *cmd]
    log = out / "logs" / "loss.jsonl"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    first = None
    while proc.poll() is None:
        if first is None and log.exists() and log.read_text().strip():
            first = time.perf_counter() - t0
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"hvtune train failed ({proc.returncode}):\n{stdout[-2000:]}\n{stderr[-3000:]}")
    rows = loss_rows(out)
    if first is None:  # finished between two polls
        first = wall
    rss_kb, how = None, None
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if match:
        rss_kb, how = int(match.group(1)), "/usr/bin/time -v"
    else:
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        rss_kb, how = after, "getrusage(RUSAGE_CHILDREN).ru_maxrss" + (" (max over children so far)" if before else "")
    return {
        "command": " ".join(cmd[cmd.index(sys.executable) :]).replace(sys.executable, "python"),
        "start_to_first_step_s": round(first, 2),
        "first_step_own_s": rows[0]["seconds"],
        "before_loop_s": round(first - rows[0]["seconds"], 2),
        "process_wall_s": round(wall, 2),
        "steps": len(rows),
        "peak_rss_gb": round(rss_kb / 1024**2, 3),
        "peak_rss_method": how,
    }


# The libraries the first training step cannot run without (the LoRA is injected by peft, which imports
# transformers): no trainer can start faster than a process that only imports them.
FLOOR_IMPORTS = "import torch, accelerate, peft; from diffusers import HunyuanVideo15Transformer3DModel"


def measure_floor() -> float:
    """Seconds from starting a process that only imports what the first step needs (FLOOR_IMPORTS) to the line it
    prints once they are imported: like the start-up, it leaves out the interpreter's teardown at exit."""
    cmd = [sys.executable, "-c", FLOOR_IMPORTS + "; print('imported', flush=True)"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=subprocess_env())
    line = proc.stdout.readline()
    seconds = time.perf_counter() - t0
    proc.communicate()
    if proc.returncode != 0 or line.strip() != "imported":
        raise RuntimeError(f"{FLOOR_IMPORTS!r} failed ({proc.returncode})")
    return seconds


TRAIN_IMPORTS = (
    "import hvtune.cli, hvtune.trainer, torch, accelerate, accelerate.utils, peft.utils, tqdm; "
    "from diffusers import HunyuanVideo15Transformer3DModel; import diffusers.optimization; "
    "import torch.utils.tensorboard"
)


def measure_imports(top: int = 12) -> dict:
    """`python -X importtime` of what `hvtune train` imports before its first step; top-level modules by cumulative."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", TRAIN_IMPORTS], capture_output=True, text=True, env=subprocess_env()
    )
    wall = time.perf_counter() - t0
    rows = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m and not m.group(3).strip(" ") and len(m.group(3)) == 1:  # top level: one space after the bar
            rows.append((int(m.group(2)), m.group(4)))
    rows.sort(reverse=True)
    return {
        "statement": TRAIN_IMPORTS,
        "process_wall_s": round(wall, 2),
        "sum_top_level_s": round(sum(us for us, _ in rows) / 1e6, 2),
        "top": [{"module": name, "cumulative_s": round(us / 1e6, 3)} for us, name in rows[:top]],
    }


# -------------------------------------------------------------------------------------------------- 4. cached rerun


def _latents_cached(root: Path) -> int:
    vae = root / "cache" / "vae"
    return sum(1 for _ in vae.rglob("*.safetensors")) if vae.exists() else 0


def measure_cache(root: Path, model: Path, clips: int, first_limit: float, reruns: int) -> dict:
    from hvtune.testing.synth import write_synthetic_dataset

    clips_dir = root / "clips"
    t0 = time.perf_counter()
    write_synthetic_dataset(clips_dir, clips=clips, seed=1, size=(64, 48), num_frames=9, fps=24)
    synth_s = time.perf_counter() - t0
    config = write_cache_project(
        root,
        model,
        clips_dir,
        # 64x48 clips train at 64x48 (with alignment 16)
        dataset={"resolution": 48, "resolution_type": "pixel", "video": {"num_frames": 9, "min_frames": 9}},
        output_dir=str(root / "output"),
        aspect_bucket_alignment=16,
    )
    cmd = hvtune_command("cache", "--config", str(config))
    t0 = time.perf_counter()
    completed = True
    try:
        subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=first_limit, check=True)
    except subprocess.TimeoutExpired:
        completed = False
    first_s = time.perf_counter() - t0
    used = clips
    if not completed:
        # keep only the clips the first build got through (their cache files exist) and finish those
        manifest_clips = sorted(clips_dir.glob("*.mp4"))
        done = max(2, _latents_cached(root))
        used = min(done, len(manifest_clips))
        for extra in manifest_clips[used:]:
            extra.unlink()
            extra.with_suffix(".txt").unlink(missing_ok=True)
        subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), check=True)
    walls = []
    last = None
    for _ in range(reruns):
        wall, last = run(cmd)
        walls.append(wall)
    summary = [line.strip() for line in last.stdout.splitlines() if "hit" in line or "written" in line]
    rerun = statistics.median(walls)
    return {
        "clips_requested": clips,
        "clips": used,
        "clip": "64x48 h264, 9 frames, textfile captions, tiny model encoders",
        "synth_s": round(synth_s, 1),
        "first_build_completed": completed,
        "first_build_process_wall_s": round(first_s, 1),
        "command": "python -m hvtune cache --config CONFIG",
        "rerun_process_wall_s": [round(w, 2) for w in walls],
        "rerun_median_s": round(rerun, 2),
        "rerun_per_clip_ms": round(1000 * rerun / used, 2),
        "rerun_summary": summary,
    }


# ---------------------------------------------------------------------------------------------------------- main


def _verdict(value, budget, *, strict=False) -> str:
    ok = value < budget if strict else value <= budget
    return "met" if ok else "MISSED"


def measure_startups(config: Path, work: Path, runs: int) -> tuple[dict, list[dict]]:
    """`runs` start-ups alternating with the import floor (so machine load hits both): the medians, and each run."""
    startup_runs, floors = [], []
    for i in range(runs):
        startup_runs.append(measure_startup(config, work / f"startup-{i}", 3))
        floors.append(measure_floor())
    startup = dict(startup_runs[0])  # command and RSS method; every figure below is a median over the runs
    for key in ("start_to_first_step_s", "before_loop_s", "first_step_own_s"):
        startup[key] = round(statistics.median(r[key] for r in startup_runs), 2)
        startup[f"{key}_runs"] = [r[key] for r in startup_runs]
    beyond = [r["start_to_first_step_s"] - f for r, f in zip(startup_runs, floors, strict=True)]
    startup["import_floor"] = {
        "statement": FLOOR_IMPORTS,
        "process_wall_s_runs": [round(f, 2) for f in floors],
        "median_s": round(statistics.median(floors), 2),
        # everything else up to the first step: hvtune's config/manifest/accelerate/LoRA setup, loading the
        # weights and step 1 itself; run by run, so the spread shows how much of it is noise
        "beyond_floor_s_runs": [round(b, 2) for b in beyond],
        "beyond_floor_s_median": round(statistics.median(beyond), 2),
    }
    startup["peak_rss_gb"] = max(r["peak_rss_gb"] for r in startup_runs)
    return startup, startup_runs


def measure_cache_for_200(work: Path, clips: int, first_limit: float, reruns: int) -> dict:
    """`measure_cache` on the demo's model, with the rerun scaled to 200 clips."""
    cache = measure_cache(work / "cache200", work / "demo" / "tiny-t2v-model", clips, first_limit, reruns)
    n = cache["clips"]
    # below 200 clips: scaled linearly from n clips, an upper bound (the process start-up is a fixed cost); not
    # done from fewer than 20 clips (quick runs), where start-up is nearly all of it
    per200 = cache["rerun_median_s"] * (200 / n if n < 200 else 1) if n >= 20 else None
    cache["rerun_s_for_200"] = None if per200 is None else round(per200, 2)
    cache["rerun_s_for_200_extrapolated"] = n != 200
    return cache


def _budgets(ratio: dict, startup: dict, cache: dict) -> dict:
    c200 = cache["rerun_s_for_200"]
    return {
        "step_ratio": {
            "value": ratio["ratio"],
            "budget": "<= 1.10",
            "verdict": _verdict(ratio["ratio"], BUDGETS["step_ratio"]),
        },
        "start_to_first_step_s": {
            "value": startup["start_to_first_step_s"],
            "budget": "<= 10 s",
            "verdict": _verdict(startup["start_to_first_step_s"], 10.0),
        },
        "peak_rss_gb": {
            "value": startup["peak_rss_gb"],
            "budget": "<= 1.0 GB",
            "verdict": _verdict(startup["peak_rss_gb"], 1.0),
        },
        "cached_rerun_200_clips_s": {
            "value": c200,
            "budget": "< 5 s",
            "verdict": "not measured (too few clips)" if c200 is None else _verdict(c200, 5.0, strict=True),
            "extrapolated": cache["rerun_s_for_200_extrapolated"],
        },
    }


def _print_budgets(doc: dict) -> None:
    ratio, startup, cache, budgets = doc["step_ratio"], doc["startup"], doc["cache_rerun"], doc["budgets"]
    print()
    print(f"{'budget':34s} {'measured':>12s} {'target':>10s}  verdict")
    c200 = cache["rerun_s_for_200"]
    extrapolated = " (extrap.)" if cache["rerun_s_for_200_extrapolated"] else ""
    rows = [
        ("steady-state step / bare loop", f"{ratio['ratio']:.3f}x", "<= 1.10x", "step_ratio"),
        (
            "start to first finished step",
            f"{startup['start_to_first_step_s']:.1f} s",
            "<= 10 s",
            "start_to_first_step_s",
        ),
        ("peak RSS, tiny training run", f"{startup['peak_rss_gb']:.2f} GB", "<= 1.0 GB", "peak_rss_gb"),
        (
            f"cached `hvtune cache`, 200 clips{extrapolated}",
            "-" if c200 is None else f"{c200:.2f} s",
            "< 5 s",
            "cached_rerun_200_clips_s",
        ),
    ]
    for name, value, target, key in rows:
        print(f"{name:34s} {value:>12s} {target:>10s}  {budgets[key]['verdict']}")


def _print_details(doc: dict) -> None:
    ratio, startup, cache, imports = doc["step_ratio"], doc["startup"], doc["cache_rerun"], doc["imports"]
    print(
        f"\nmedian step: trainer {ratio['trainer_median_step_s']:.3f} s, bare {ratio['bare_median_step_s']:.3f} s "
        f"({ratio['rounds']} rounds x {ratio['timed_steps_per_run']} steps, {ratio['warmup_steps_skipped']} skipped)"
    )
    print(f"start-up: {startup['before_loop_s']:.1f} s before the loop + {startup['first_step_own_s']:.1f} s step 1")
    floor = startup["import_floor"]
    print(
        f"import floor (a process importing only torch, accelerate, peft and the diffusers model): "
        f"{floor['median_s']:.1f} s; the rest of the start-up (setup, weights, step 1): "
        f"{floor['beyond_floor_s_median']:.1f} s (runs: {', '.join(f'{b:.1f}' for b in floor['beyond_floor_s_runs'])})"
    )
    if imports:
        print("slowest imports: " + ", ".join(f"{r['module']} {r['cumulative_s']:.1f}s" for r in imports["top"][:6]))
    state = "complete" if cache["first_build_completed"] else "cut off"
    print(
        f"cache rerun: {cache['clips']} clips in {cache['rerun_median_s']:.2f} s; "
        f"first build {cache['first_build_process_wall_s']:.0f} s ({state})"
    )


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smallest sizes: a smoke run for the test suite")
    parser.add_argument("--out", default=str(RESULTS / "train.json"))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=None, help="steps skipped at the start of each run")
    parser.add_argument("--cache-clips", type=int, default=None)
    parser.add_argument("--cache-first-limit", type=float, default=240.0, help="seconds for the first cache build")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    q = args.quick
    args.rounds = args.rounds or (1 if q else 6)
    args.steps = args.steps or (2 if q else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 3)
    args.cache_clips = args.cache_clips or (4 if q else 200)
    return args


def measure_all(work: Path, args: argparse.Namespace) -> dict:
    """Every measurement, in the order of the module doc, in the temporary folder `work`."""
    from hvtune.testing.demo import write_demo_project

    q = args.quick
    print(f"work dir {work}", flush=True)
    t0 = time.perf_counter()
    config = write_demo_project(work / "demo", clips=2 if q else 8, seed=0, steps=40)
    project_s = time.perf_counter() - t0
    cache_first, _ = run(hvtune_command("cache", "--config", str(config)))
    setup = {"demo_project_s": round(project_s, 1), "demo_cache_first_s": round(cache_first, 1)}
    print(f"demo project + cache: {setup}", flush=True)
    print("1. step ratio (trainer vs bare loop, alternating)", flush=True)
    ratio = measure_ratio(config, work, args.rounds, args.warmup, args.steps)
    print("2-3. start-up and peak RSS of `hvtune train`", flush=True)
    startup, startup_runs = measure_startups(config, work, 1 if q else 3)
    imports = None
    if not q or startup["start_to_first_step_s"] > BUDGETS["start_to_first_step_s"]:
        imports = measure_imports()
    print("4. fully cached `hvtune cache`", flush=True)
    cache = measure_cache_for_200(work, args.cache_clips, args.cache_first_limit, 1 if q else 3)
    return dict(setup=setup, ratio=ratio, startup=startup, startup_runs=startup_runs, imports=imports, cache=cache)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="hvtune-bench-train-"))
    try:
        m = measure_all(work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    import torch

    doc = {
        "benchmark": "train",
        "quick": args.quick,
        "command": "python benchmarks/bench_train.py" + (" --quick" if args.quick else ""),
        "machine": {**machine(), "torch": torch.__version__},
        "budgets": _budgets(m["ratio"], m["startup"], m["cache"]),
        "setup": m["setup"],
        "step_ratio": m["ratio"],
        "startup": m["startup"],
        "startup_runs": m["startup_runs"],
        "imports": m["imports"],
        "cache_rerun": m["cache"],
        "total_s": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    write_result(out, doc)
    _print_budgets(doc)
    _print_details(doc)
    print(f"wrote {out} ({doc['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
