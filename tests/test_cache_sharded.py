"""Issue 17: `hvtune cache` on N processes builds the same cache as one process, and survives a killed process.

Real processes: two of them under `accelerate launch` (gloo on this CPU), through the container's `cache` entrypoint
(NUM_PROCESSES=2) and through `accelerate launch -m hvtune cache` as a user outside a container runs it. Every build
here runs one torch thread per process (torchrun's default for each launched process): on a CPU the VAE's float sums
depend on the thread count, so a 2-thread process and a 1-thread process encode different bits whatever the split.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, run_hvtune
from hvtune.cache.shard import BUILDS_FILE, Shard

ROOT = Path(__file__).resolve().parents[1]
# a progress line whenever the count moves: even the tiny phases here show their interval lines
CACHE_ENV = {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HVTUNE_PROGRESS_SECONDS": "0",
}
TRAIN = ["--max_train_steps=4", "--validation_disable=true", "--checkpointing_steps=2"]


# ------------------------------------------------------------------------------------------------------- the split


@pytest.mark.parametrize("world", [2, 3, 8])
def test_each_missing_entry_has_exactly_one_process_balanced_and_the_same_for_the_same_misses(tmp_path, world):
    keys = [f"{i:03d}{'abcdef'[i % 6]}" for i in range(50)]
    shares = [Shard(tmp_path, rank, world).share(keys, "text") for rank in range(world)]
    assert sorted(k for share in shares for k in share) == sorted(keys)  # every entry once
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    for share in shares:
        assert share == [k for k in keys if k in share]  # in the phase's own order
    # the owner depends on the keys, not on the order the phase met them in
    assert [set(Shard(tmp_path, rank, world).share(keys[::-1], "text")) for rank in range(world)] == list(
        map(set, shares)
    )
    assert Shard(tmp_path).share(keys, "text") == keys  # one process: all of it


def test_a_build_records_where_it_encoded_next_to_the_cache(demo_project):
    """One line per build that encoded: the misses, and this process's device and torch thread count - what the
    encoders' last bits depend on (docs/REPRODUCIBILITY.md); the keys do not change with them."""
    import torch

    [build] = _builds(demo_project.parent.parent / "cache")
    assert build["misses"] == {"text": 10, "latent": 8} and build["torch"] == torch.__version__
    cpu = f"cpu {torch.backends.cpu.get_cpu_capability()}"
    assert build["processes"] == [{"device": cpu, "threads": torch.get_num_threads()}]  # the fixture's build: here


# --------------------------------------------------------------------------------------------------- the processes


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        **CACHE_ENV,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT / "app"),
        **extra,
    }


def _launch(config: Path) -> list[str]:
    """`accelerate launch` with 2 processes, as a user outside a container runs a sharded cache."""
    return [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--num_processes=2",
        "--num_machines=1",
        "--multi_gpu",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={free_port()}",
        "-m",
        "hvtune",
        "cache",
        "--config",
        str(config),
    ]


def _entrypoint_cache(config: Path, data_root: Path) -> subprocess.CompletedProcess:
    """The container's `cache` service with NUM_PROCESSES=2."""
    data_root.mkdir(exist_ok=True)
    (data_root / "datasets").symlink_to(config.parent.parent / "datasets" / "clips")
    env = _env(
        HVTUNE_DATA_ROOT=str(data_root),
        HVTUNE_CONFIG=str(config),
        HVTUNE_SKIP_FETCH="1",
        NUM_PROCESSES="2",
        MAIN_PROCESS_PORT=str(free_port()),
    )
    return subprocess.run(["bash", str(ROOT / "entrypoints" / "cache")], capture_output=True, text=True, env=env)


def _one_process_cache(config: Path) -> subprocess.CompletedProcess:
    return run_hvtune("cache", "--config", str(config), env=CACHE_ENV)


def _files(cache: Path) -> dict[str, bytes]:
    """Every file of a cache but the other libraries' log (timestamps) and `builds.jsonl`, the record of where each
    build encoded (it names the process count and the time: telling builds apart is its point; `_builds` reads it)."""
    return {
        p.relative_to(cache).as_posix(): p.read_bytes()
        for p in sorted(cache.rglob("*"))
        if p.is_file() and p.name not in ("libraries.log", BUILDS_FILE)
    }


def _builds(cache: Path) -> list[dict]:
    return [json.loads(line) for line in (cache / BUILDS_FILE).read_text().splitlines()]


def _progress_counts(log: str, phase: str, unit: str, total: int) -> list[int]:
    """The counts of a phase's progress lines in a log that is not a terminal: complete lines with the count of
    every process out of the phase's `total`, a rate and an ETA, then exactly one last line; no carriage return."""
    assert "\r" not in log, "carriage-return updates reach a log that is not a terminal"
    count = rf"^{phase}: +\d+% (\d+)/{total} {unit}s \| [\d.]+ s/{unit} \| "
    interval = [int(m[1]) for m in re.finditer(count + r"ETA \d+:\d\d:\d\d$", log, re.M)]
    last = [int(m[1]) for m in re.finditer(count + r"done in \d+:\d\d:\d\d$", log, re.M)]
    assert interval and len(last) == 1, log[-3000:]
    assert interval == sorted(interval) and interval[-1] <= last[0], interval  # one writer: the count only grows
    assert len(re.findall(rf"^{phase}: ", log, re.M)) == len(interval) + 1  # no other line of the phase
    return [*interval, last[0]]


def _counts(stdout: str) -> dict[str, tuple[int, int]]:
    """The summary's `name  hits hit  misses encoded` lines."""
    return {m[1]: (int(m[2]), int(m[3])) for m in re.finditer(r"^  (\w+)\s+(\d+) hit\s+(\d+) encoded$", stdout, re.M)}


@pytest.mark.slow
def test_two_processes_build_the_t2v_cache_of_one_byte_for_byte_and_train_identically(tmp_path):
    from hvtune.testing.demo import write_demo_project

    config = write_demo_project(tmp_path / "demo", task="t2v", steps=4)
    cache = tmp_path / "demo" / "cache"

    sharded = _entrypoint_cache(config, tmp_path / "data")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "with accelerate launch: 2 processes on 1 machine(s)" in sharded.stderr
    assert _counts(sharded.stdout) == {"text": (0, 10), "latent": (0, 8)}  # the totals of both processes
    assert _progress_counts(sharded.stderr, "vae", "clip", 8)[-1] == 8  # the main process counts both processes
    assert _progress_counts(sharded.stderr, "text", "caption", 10)[-1] == 10
    assert not (cache / ".shard_progress").exists()
    r = run_hvtune("train", "--config", str(config), f"--output_dir={tmp_path / 'run-2'}", *TRAIN)
    assert r.returncode == 0, r.stderr[-3000:]
    cache.rename(tmp_path / "cache-2")

    single = _one_process_cache(config)
    assert single.returncode == 0, single.stderr[-3000:]
    assert _counts(single.stdout) == _counts(sharded.stdout)
    assert _progress_counts(single.stderr, "vae", "clip", 8) == [*range(1, 9), 8]  # a line per clip (interval 0)
    r = run_hvtune("train", "--config", str(config), f"--output_dir={tmp_path / 'run-1'}", *TRAIN)
    assert r.returncode == 0, r.stderr[-3000:]

    one, two = _files(cache), _files(tmp_path / "cache-2")
    assert sorted(one) == sorted(two)
    assert [name for name in one if one[name] != two[name]] == []
    assert {"manifest.json", "cache_report.jsonl", "text/index.json"} <= set(one)
    # where each build encoded: the same misses and dtype; 2 processes of 1 thread vs 1 of 1 thread, on this CPU
    [sharded_build], [single_build] = _builds(tmp_path / "cache-2"), _builds(cache)
    assert sharded_build["misses"] == single_build["misses"] == {"text": 10, "latent": 8}
    assert sharded_build["dtype"] == single_build["dtype"] == "float32"
    cpu = {"device": single_build["processes"][0]["device"], "threads": 1}
    assert cpu["device"].startswith("cpu ")
    assert single_build["processes"] == [cpu] and sharded_build["processes"] == [cpu, cpu]
    again = _one_process_cache(config)  # every entry a hit: nothing encoded, no line added
    assert again.returncode == 0 and _counts(again.stdout)["latent"] == (8, 0), again.stderr[-3000:]
    assert _builds(cache) == [single_build]
    c = run_hvtune("compare", str(tmp_path / "run-1"), str(tmp_path / "run-2"), cwd=tmp_path)
    assert c.returncode == 0 and "verdict: IDENTICAL" in c.stdout, c.stdout + c.stderr


@pytest.mark.slow
def test_two_processes_build_the_i2v_cache_of_one_byte_for_byte(tmp_path):
    from hvtune.testing.demo import write_demo_project

    config = write_demo_project(tmp_path / "demo", task="i2v", clips=4, steps=4)
    cache = tmp_path / "demo" / "cache"
    sharded = subprocess.run(_launch(config), capture_output=True, text=True, env=_env())
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert _counts(sharded.stdout) == {"text": (0, 6), "latent": (0, 4), "siglip": (0, 4)}
    cache.rename(tmp_path / "cache-2")
    single = _one_process_cache(config)
    assert single.returncode == 0, single.stderr[-3000:]
    one, two = _files(cache), _files(tmp_path / "cache-2")
    assert sorted(one) == sorted(two)
    assert [name for name in one if one[name] != two[name]] == []
    assert "validation/index.json" in one  # the i2v validation conditions, written by the main process


@pytest.mark.slow
def test_on_a_terminal_the_cache_phases_stay_tqdm_bars(tmp_path):
    """`hvtune cache` with its stderr on a terminal (a pseudo-terminal here): tqdm bars, not log lines."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    from hvtune.testing.demo import write_demo_project

    config = write_demo_project(tmp_path / "demo", task="t2v", clips=2, steps=4)
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 120 columns, as a window has
    chunks: list[bytes] = []

    def drain() -> None:  # the terminal's buffer is small: read while the build writes
        with contextlib.suppress(OSError):
            while chunk := os.read(main, 4096):
                chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    cmd = [sys.executable, "-m", "hvtune", "cache", "--config", str(config)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=terminal, env=_env(), timeout=600)
    os.close(terminal)
    reader.join(timeout=10)
    os.close(main)
    shown = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, shown[-3000:]
    redrawn = re.search(r"\r(?!\n)", shown)  # a carriage return that is not the terminal's end of line
    assert redrawn and re.search(r"vae: 100%\|.*\| 2/2", shown), shown[-3000:]
    assert " s/clip | ETA " not in shown and "done in" not in shown  # no log lines on a terminal


def _break_frames(clip: Path, out: Path, caption: str) -> None:
    """A copy of `clip` whose packets from the fifth on are zeros: the scan (which demuxes every packet but decodes
    only the first frame) takes it, the VAE phase's decode fails - as with a clip damaged in the middle."""
    import av

    data = bytearray(clip.read_bytes())
    with av.open(str(clip)) as container:
        for entry in list(container.streams.video[0].index_entries)[4:]:
            data[entry.pos : entry.pos + entry.size] = bytes(entry.size)
    out.write_bytes(bytes(data))
    out.with_suffix(".txt").write_text(caption)


def _vae_owners(config: Path, names: list[str]) -> dict[str, int]:
    """Which of 2 processes decodes each of the clips `names` in a first build (the split of the VAE phase)."""
    from hvtune.cache.layout import CacheLayout
    from hvtune.cache.plan import Build, missing, plan_keys
    from hvtune.config.settings import load_config
    from hvtune.data.datasets import scan

    resolved = load_config(config, env={})
    layout = CacheLayout(resolved)
    build = Build(layout, False, Shard(layout.root))
    plans, _ = plan_keys(build, scan(resolved, progress=False))
    jobs, _ = missing(build, plans, "latent_key")
    shares = {r: Shard(layout.root, r, 2).share(jobs, "vae", lambda p: p.latent_key, show=False) for r in (0, 1)}
    return {p.sample.rel: r for r, share in shares.items() for p in share if p.sample.rel in names}


def _summary(stdout: str) -> str:
    """What `hvtune cache` printed, less the time it took."""
    return re.sub(r" in [\d.]+ s$", "", stdout, flags=re.M)


@pytest.mark.slow
def test_clips_that_fail_to_decode_are_reported_once_by_two_processes_as_by_one(tmp_path):
    """Three damaged clips and a byte-identical twin of one (it shares the entry, so its fate): the report, the
    summary, the exit status and every cache file are those of one process, and `cache verify` passes."""
    from hvtune.testing.demo import write_demo_project

    config = write_demo_project(tmp_path / "demo", task="t2v", clips=8, steps=4)
    cache, clips = tmp_path / "demo" / "cache", tmp_path / "demo" / "datasets" / "clips"
    broken = ["broken_a.mp4", "broken_b.mp4", "broken_c.mp4", "broken_c_twin.mp4"]
    for i, name in enumerate(broken[:3]):
        _break_frames(clips / f"clip_{i:04d}.mp4", clips / name, f"a damaged clip number {i}")
    (clips / broken[3]).write_bytes((clips / broken[2]).read_bytes())
    (clips / broken[3]).with_suffix(".txt").write_text("the damaged clip's twin")
    assert _vae_owners(config, broken[:3]) == {"broken_a.mp4": 1, "broken_b.mp4": 0, "broken_c.mp4": 1}  # both fail

    sharded = subprocess.run(_launch(config), capture_output=True, text=True, env=_env())
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    report = [json.loads(line) for line in (cache / "cache_report.jsonl").read_text().splitlines()]
    failed = [Path(r["source"]).name for r in report if r["action"] == "skipped"]
    assert sorted(failed) == broken, report  # each once, named, with why
    assert {r["reason"] for r in report if r["action"] == "skipped"} == {"corrupt"}
    assert "corrupt                  4" in sharded.stdout and "12 found, 8 used" in sharded.stdout
    assert _progress_counts(sharded.stderr, "vae", "clip", 11)[-1] == 8  # 3 of the 11 distinct clips failed
    verify = run_hvtune("cache", "verify", "--config", str(config))
    assert verify.returncode == 0 and "every entry intact" in verify.stdout, verify.stdout + verify.stderr
    cache.rename(tmp_path / "cache-2")

    single = _one_process_cache(config)
    assert single.returncode == sharded.returncode == 0, single.stderr[-3000:]
    assert _summary(single.stdout) == _summary(sharded.stdout)
    one, two = _files(cache), _files(tmp_path / "cache-2")
    assert sorted(one) == sorted(two)
    assert [name for name in one if one[name] != two[name]] == []  # the report in the same order, the manifest


def _whole_entries(root: Path) -> dict[Path, tuple[int, int]]:
    """Every whole entry under `root` -> (inode, mtime): an entry written again gets a new inode."""
    from hvtune.cache.store import entry_intact

    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*.safetensors") if entry_intact(p)}


@pytest.mark.slow
@pytest.mark.parametrize("rerun_processes", [1, 2])
def test_a_process_killed_mid_phase_leaves_whole_entries_and_a_rerun_encodes_only_the_rest(tmp_path, rerun_processes):
    from hvtune.testing.demo import write_demo_project

    clips = 16
    config = write_demo_project(tmp_path / "demo", task="t2v", clips=clips, steps=4)
    cache = tmp_path / "demo" / "cache"
    vae = cache / "vae" / "synthetic-clips"
    log = (tmp_path / "killed.log").open("w")  # a file, not a pipe: nobody reads it while the processes run
    launcher = subprocess.Popen(_launch(config), stdout=log, stderr=subprocess.STDOUT, env=_env())
    killed = None
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and launcher.poll() is None:
            if len(list(vae.rglob("*.safetensors"))) >= 3:  # mid-way through the VAE phase
                killed = _rank_pid(launcher.pid, rank=1)
                if killed:
                    os.kill(killed, signal.SIGKILL)
                    break
            time.sleep(0.05)
        launcher.wait(timeout=120)
    finally:
        log.close()
        for pid in [*_descendants(launcher.pid), launcher.pid]:  # only when the test itself failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert killed, "rank 1 was not found mid-phase"
    assert launcher.returncode != 0, (tmp_path / "killed.log").read_text()[-3000:]
    whole = _whole_entries(cache)
    whole_latents = len([p for p in whole if vae in p.parents])
    assert whole_latents < clips, "the kill came after the VAE phase"
    assert not (cache / "manifest.json").exists()  # nothing pretends the cache is complete

    if rerun_processes == 1:
        rerun = _one_process_cache(config)
    else:
        rerun = subprocess.run(_launch(config), capture_output=True, text=True, env=_env())
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert _counts(rerun.stdout)["latent"] == (whole_latents, clips - whole_latents), rerun.stdout
    assert _counts(rerun.stdout)["text"][1] == 0  # the text phase had finished before the kill
    after = _whole_entries(cache)
    assert {p: after.get(p) for p in whole} == whole, "an entry that was whole was encoded again"
    verify = run_hvtune("cache", "verify", "--config", str(config))
    assert verify.returncode == 0 and "every entry intact" in verify.stdout, verify.stdout + verify.stderr
    assert not list(cache.rglob("*.tmp")) and not (cache / ".shard_progress").exists()


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts each worker in a session of its own, so not by session)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if proc.name.isdigit():
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(proc.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the launched process with RANK=`rank`."""
    for pid in _descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None
