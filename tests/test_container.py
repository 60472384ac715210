"""End-to-end on a real Docker engine: build the cpu image from docker/Dockerfile, run `docker compose --profile cpu up
train` (cache first, then training) on the tiny model and synthetic clips with datasets and outputs as bind mounts,
check the LoRA, run.json and validation video land on the host owned by the host uid, that a second `up` re-encodes
nothing, that `all` does the same in ONE container (RunPod layout under /workspace), that `docker stop` makes training
checkpoint and exit cleanly, and that every bad input gets one line and a non-zero exit.

Engine: as root on a Debian host, docker/ci-engine.sh installs docker.io, starts dockerd, builds the local Debian base
image (registries may be unreachable) and installs compose v2; elsewhere an already running engine is used, with
debian:bookworm-slim as the cpu base. Under CI=true this test never skips: no engine is a failure.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.container]

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# HVTUNE_TEST_IMAGE: a distinct name, so that test runs from several checkouts on one engine never share images
IMAGE_NAME = os.environ.get("HVTUNE_TEST_IMAGE", "hvtune-test")
IMAGE = f"{IMAGE_NAME}:cpu"
PROJECT = f"{IMAGE_NAME}-e2e"
TORCH_VERSION = re.search(r'&torch-version "([^"]+)"', (ROOT / "docker" / "compose.vendors.yaml").read_text())[1]
TORCH_WHEEL = f"torch-{TORCH_VERSION}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
PUID = os.getuid() if os.getuid() != 0 else 1000
PGID = os.getgid() if os.getuid() != 0 else 1000
STEPS = 4
TIMINGS: dict[str, float] = {}


def unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"CI=true: the container test must run, but {reason}")
    pytest.skip(reason)


def run(cmd: list[str], *, env: dict | None = None, timeout: int = 900, check: bool = True, **kw):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def clean_env(**extra: str) -> dict:
    """The caller's environment without compose/hvtune settings that would change what the test builds or runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "HVTUNE_", "CPU_", "DOCKER_"))}
    env.update(extra)
    return env


def memlock_limit() -> int:
    """compose asks for an unlimited memlock; a sandboxed daemon (no CAP_SYS_RESOURCE) may only keep its own limit."""
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    return -1 if hard == resource.RLIM_INFINITY else hard


def chown_tree(path: Path) -> None:
    if os.getuid() != 0:
        return
    for p in [path, *path.rglob("*")]:
        os.chown(p, PUID, PGID, follow_symlinks=False)


@pytest.fixture(scope="module")
def engine() -> str:
    """A working engine + compose v2; returns the cpu base image to build from."""
    t0 = time.monotonic()
    base = os.environ.get("HVTUNE_TEST_CPU_BASE")
    if os.getuid() == 0 and shutil.which("apt-get"):
        proc = subprocess.run([str(ROOT / "docker" / "ci-engine.sh")], capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0:
            unavailable(f"docker/ci-engine.sh failed: {proc.stderr.strip().splitlines()[-1:]}")
        base = base or "local/bookworm"
        # the machine's proxy CA certificates go in through the image's extra-CA input
        certs = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
        for crt in certs:
            dest = ROOT / "docker" / "certs" / crt.name
            if not dest.exists() or dest.read_bytes() != crt.read_bytes():
                shutil.copyfile(crt, dest)
    elif not shutil.which("docker") or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        unavailable("no Docker engine: not root on a Debian host (docker/ci-engine.sh) and `docker info` fails")
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        unavailable("docker compose v2 is not installed (docker/ci-engine.sh installs it)")
    TIMINGS["engine"] = time.monotonic() - t0
    return base or "debian:bookworm-slim"


@pytest.fixture(scope="module")
def image(engine) -> str:
    """The cpu image, built through compose exactly as `make build-cpu` does."""
    wheels = ROOT / "docker" / "wheels"
    extra = {}
    if not (wheels / TORCH_WHEEL).exists():
        local = Path("/opt/wheels") / TORCH_WHEEL
        if local.exists():
            wheels.mkdir(exist_ok=True)
            shutil.copyfile(local, wheels / TORCH_WHEEL)
        else:
            extra["CPU_TORCH_INDEX_URL"] = "https://download.pytorch.org/whl/cpu"
    env = clean_env(
        COMPOSE_PROFILES="cpu",
        CPU_BASE_IMAGE=engine,
        HVTUNE_IMAGE=IMAGE_NAME,
        PUID=str(PUID),
        PGID=str(PGID),
        **extra,
    )
    t0 = time.monotonic()
    run(["docker", "compose", "--env-file", os.devnull, "-p", PROJECT, "build", "cache"], env=env, cwd=ROOT)
    TIMINGS["build"] = time.monotonic() - t0
    labels = json.loads(run(["docker", "image", "inspect", "-f", "{{json .Config.Labels}}", IMAGE]).stdout)
    assert labels["io.hvtune.torch.version"] == TORCH_VERSION
    assert labels["io.hvtune.vendor"] == "cpu"
    assert labels["org.opencontainers.image.base.name"] == engine
    return IMAGE


def docker_run(image: str, *args: str, mounts=(), env=(), user: str | None = None, check=True, timeout=900):
    cmd = ["docker", "run", "--rm", "--user", user or f"{PUID}:{PGID}"]
    for src, dst, mode in mounts:
        cmd += ["-v", f"{src}:{dst}:{mode}"]
    for kv in env:
        cmd += ["-e", kv]
    return run([*cmd, image, *args], check=check, timeout=timeout)


def write_project(root: Path, data_prefix: str, image: str) -> dict[str, Path]:
    """Tiny model + synthetic clips (made inside the image, as the container user) + config in the dataset folder."""
    dirs = {name: root / name for name in ("datasets", "models", "outputs")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    chown_tree(root)
    docker_run(image, "hvtune", "tiny-model", "/m/tiny-t2v", mounts=[(dirs["models"], "/m", "rw")])
    docker_run(image, "hvtune", "synth-dataset", "/d/clips", "--clips", "4", mounts=[(dirs["datasets"], "/d", "rw")])
    backends = [
        {
            "id": "synthetic-clips",
            "type": "local",
            "dataset_type": "video",
            "instance_data_dir": f"{data_prefix}/datasets/clips",
            "caption_strategy": "textfile",
            "resolution": 32,
            "resolution_type": "pixel",
            "video": {"num_frames": 9, "min_frames": 9, "bucket_strategy": "aspect_ratio"},
        },
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True},
    ]
    config = {
        "model_type": "lora",
        "model_family": "hunyuanvideo",
        "pretrained_model_name_or_path": f"{data_prefix}/models/tiny-t2v",
        "model_flavour": "t2v-480p",
        "dataset_backend_config": "multidatabackend.json",
        "aspect_bucket_alignment": 16,
        "validation_resolution": "48x32",
        "validation_num_video_frames": 9,
        "validation_num_inference_steps": 2,
        "validation_steps": STEPS,
        "train_batch_size": 2,
        "learning_rate": 1e-3,
        "max_train_steps": STEPS,
        "checkpointing_steps": 2,
        "mixed_precision": "no",
        "base_model_precision": "no_change",
        "optimizer": "adamw",
        "lora_rank": 4,
        "seed": 1,  # SimpleTuner's seed 0 draws a new seed from the clock
    }
    (dirs["datasets"] / "multidatabackend.json").write_text(json.dumps(backends, indent=2))
    (dirs["datasets"] / "config.json").write_text(json.dumps(config, indent=2))
    chown_tree(root)
    return dirs


def assert_run_outputs(out: Path) -> None:
    lora = list(out.rglob("pytorch_lora_weights.safetensors"))
    record = list(out.rglob("run.json"))
    videos = list(out.rglob("*.mp4"))
    assert lora and record and videos, f"missing outputs in {out}: {sorted(p.name for p in out.rglob('*'))[:50]}"
    for p in [*lora, *record, *videos]:
        st = p.stat()
        assert (st.st_uid, st.st_gid) == (PUID, PGID), f"{p} owned by {st.st_uid}:{st.st_gid}, not {PUID}:{PGID}"
    assert not list(out.rglob(".hvtune-write-test.*")), "entrypoint write probes must be removed"


def cache_counts(log: str) -> list[tuple[str, int, int]]:
    return [
        (m[1], int(m[2]), int(m[3])) for m in re.finditer(r"^\S*\s*\|?\s*(\w+)\s+(\d+) hit\s+(\d+) encoded", log, re.M)
    ]


def test_compose_up_train_twice_then_all_in_one_container(image, tmp_path):
    dirs = write_project(tmp_path / "compose", "/data", image)
    env_file = tmp_path / "test.env"
    env_file.write_text(
        "\n".join(
            [
                "COMPOSE_PROFILES=cpu",
                f"PUID={PUID}",
                f"PGID={PGID}",
                f"HVTUNE_IMAGE={IMAGE_NAME}",
                f"DATASET_DIR={dirs['datasets']}",
                f"MODELS_DIR={dirs['models']}",
                f"OUTPUT_DIR={dirs['outputs']}",
                f"HVTUNE_ENV_FILE={env_file}",
                "HVTUNE_CONFIG=/data/datasets/config.json",
                "HF_HUB_OFFLINE=1",
                f"MEMLOCK_LIMIT={memlock_limit()}",
                "",
            ]
        )
    )
    compose = ["docker", "compose", "-p", PROJECT, "--env-file", str(env_file)]
    env = clean_env(COMPOSE_PROFILES="cpu")
    up = [*compose, "--profile", "cpu", "up", "--abort-on-container-failure", "--attach-dependencies", "train"]
    try:
        t0 = time.monotonic()
        first = run(up, env=env, cwd=ROOT, timeout=1800)
        TIMINGS["compose up (cache + train)"] = time.monotonic() - t0
        assert_run_outputs(dirs["outputs"])
        counts = cache_counts(first.stdout)
        assert counts and sum(enc for _, _, enc in counts) > 0, f"first run encodes:\n{first.stdout[-4000:]}"

        t0 = time.monotonic()
        second = run(up, env=env, cwd=ROOT, timeout=1800)
        TIMINGS["second compose up"] = time.monotonic() - t0
        counts = cache_counts(second.stdout)
        assert counts, f"no cache summary in the second run:\n{second.stdout[-4000:]}"
        assert all(enc == 0 and hit > 0 for _, hit, enc in counts), f"second up re-encoded: {counts}"
    finally:
        run([*compose, "--profile", "cpu", "down", "-v", "--remove-orphans"], env=env, cwd=ROOT, check=False)

    # RunPod / Vast docker instance: ONE container, fetch -> cache -> train, everything under /workspace
    ws = tmp_path / "workspace"
    write_project(ws, "/workspace", image)
    t0 = time.monotonic()
    env_all = ["HVTUNE_CONFIG=/workspace/datasets/config.json", "HF_HUB_OFFLINE=1"]
    proc = docker_run(image, "all", mounts=[(ws, "/workspace", "rw")], env=env_all, timeout=1800)
    TIMINGS["docker run all"] = time.monotonic() - t0
    assert "data root /workspace" in proc.stderr
    assert_run_outputs(ws / "outputs")
    assert (ws / "cache" / "hvtune").is_dir(), "caches live under the data root"
    assert not (ws / "models" / "huggingface").exists() or (ws / "models" / "huggingface").stat().st_uid == PUID

    # a restarted pod after the run finished: nothing re-encoded, nothing retrained, the outputs are kept
    lora_bytes = (ws / "outputs" / "pytorch_lora_weights.safetensors").read_bytes()
    t0 = time.monotonic()
    again = docker_run(image, "all", mounts=[(ws, "/workspace", "rw")], env=env_all, timeout=1800)
    TIMINGS["docker run all again"] = time.monotonic() - t0
    counts = cache_counts(again.stdout)
    assert counts and all(enc == 0 for _, _, enc in counts), f"restart re-encoded: {counts}"
    assert "already finished at step" in again.stdout, again.stdout[-3000:]
    assert (ws / "outputs" / "pytorch_lora_weights.safetensors").read_bytes() == lora_bytes


def test_docker_stop_checkpoints_and_exits_cleanly(image, tmp_path):
    ws = tmp_path / "workspace"
    write_project(ws, "/workspace", image)
    cfg = json.loads((ws / "datasets" / "config.json").read_text())
    cfg.update({"max_train_steps": 500, "checkpointing_steps": 500, "validation_steps": 0})
    (ws / "datasets" / "config.json").write_text(json.dumps(cfg))
    name = f"hvtune-e2e-stop-{os.getpid()}"
    cmd = ["docker", "run", "-d", "--name", name, "--user", f"{PUID}:{PGID}", "-v", f"{ws}:/workspace:rw"]
    cmd += ["-e", "HVTUNE_CONFIG=/workspace/datasets/config.json", "-e", "HF_HUB_OFFLINE=1", image, "all"]
    t_start = time.monotonic()
    run(cmd)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            logs = run(["docker", "logs", name], check=False)
            if re.search(r"train:\s+\d+%.*?\b[1-9]\d*/500\b", logs.stdout + logs.stderr):
                break
            state = run(["docker", "inspect", "-f", "{{.State.Running}}", name]).stdout.strip()
            assert state == "true", f"container ended before training:\n{logs.stdout[-3000:]}\n{logs.stderr[-3000:]}"
            time.sleep(2)
        else:
            pytest.fail("training did not start within 15 minutes")
        TIMINGS["start to first training step"] = time.monotonic() - t_start
        time.sleep(3)
        t0 = time.monotonic()
        run(["docker", "stop", "-t", "120", name], timeout=300)
        TIMINGS["docker stop (SIGTERM checkpoint)"] = time.monotonic() - t0
        code = int(run(["docker", "inspect", "-f", "{{.State.ExitCode}}", name]).stdout)
        logs = run(["docker", "logs", name], check=False)
        assert code == 0, f"SIGTERM must end training cleanly, got {code}:\n{logs.stderr[-3000:]}"
        assert "SIGTERM: checkpoint written" in logs.stdout + logs.stderr
        checkpoints = [p for p in (ws / "outputs").rglob("*") if p.is_dir() and "checkpoint" in p.name]
        assert checkpoints, f"no checkpoint after docker stop:\n{logs.stdout[-3000:]}"
    finally:
        run(["docker", "rm", "-f", name], check=False)


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("missing dataset mount", r"dataset folder /data/datasets is not mounted"),
        ("empty dataset dir", r"dataset folder /data/datasets .*has no video or image files"),
        ("output not writable", r"output folder /data/outputs is not writable by uid:gid \d+:\d+"),
        ("missing encoder mount", r"HUNYUANVIDEO_TEXT_ENCODER_PATH=/data/models/text-encoder does not exist"),
        ("incomplete encoder mount", r"/data/models/text-encoder is incomplete; missing"),
        ("no NVIDIA GPU", r"no NVIDIA GPU visible in the container"),
        ("no AMD GPU", r"no AMD GPU visible in the container"),
        ("bad NUM_PROCESSES", r"NUM_PROCESSES=3 is not a multiple of NUM_MACHINES=2"),
        ("NUM_PROCESSES above GPUs", r"NUM_PROCESSES=2 on 1 machine\(s\) needs 2 GPU\(s\) here but 1 are visible"),
    ],
)
def test_bad_input_one_line_nonzero_nothing_written(image, tmp_path, case, expect):
    clips, empty, out, models = (tmp_path / n for n in ("clips", "empty", "out", "models"))
    for d in (clips, empty, out, models):
        d.mkdir()
    (clips / "a.mp4").write_bytes(b"\0")
    chown_tree(tmp_path)
    mounts = [(clips, "/data/datasets", "ro"), (out, "/data/outputs", "rw"), (models, "/data/models", "rw")]
    env: list[str] = ["HF_HUB_OFFLINE=1"]
    entry = "train"
    if case == "missing dataset mount":
        mounts = mounts[1:]
    elif case == "empty dataset dir":
        mounts[0] = (empty, "/data/datasets", "ro")
    elif case == "output not writable":
        if os.getuid() != 0:
            pytest.skip("needs root to make a folder the container user cannot write")
        os.chown(out, 0, 0)
        out.chmod(0o755)
    elif case in ("missing encoder mount", "incomplete encoder mount"):
        entry = "fetch-encoders"
        env.append("HUNYUANVIDEO_TEXT_ENCODER_PATH=/data/models/text-encoder")
        if case == "incomplete encoder mount":
            # a folder without the encoder files next to a complete base model: `hvtune fetch` names what is missing
            docker_run(image, "hvtune", "tiny-model", "/m/tiny-t2v", mounts=[(models, "/m", "rw")])
            (models / "text-encoder" / "text_encoder").mkdir(parents=True)
            chown_tree(models)
            env.append("HVTUNE_PRETRAINED_MODEL_NAME_OR_PATH=/data/models/tiny-t2v")
    elif case == "no NVIDIA GPU":
        env.append("HVTUNE_VENDOR=cuda")
    elif case == "no AMD GPU":
        env.append("HVTUNE_VENDOR=rocm")
    elif case == "bad NUM_PROCESSES":
        env += ["NUM_PROCESSES=3", "NUM_MACHINES=2"]
    elif case == "NUM_PROCESSES above GPUs":  # a stand-in nvidia-smi that sees one GPU
        smi = tmp_path.parent / f"{tmp_path.name}-nvidia-smi"
        smi.write_text("#!/bin/sh\necho 'GPU 0: Stand-in (UUID: GPU-0)'\n")
        smi.chmod(0o755)
        mounts.append((smi, "/usr/local/bin/nvidia-smi", "ro"))
        env += ["HVTUNE_VENDOR=cuda", "NUM_PROCESSES=2"]
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    proc = docker_run(image, entry, mounts=mounts, env=env, check=False, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert proc.returncode == 2, f"{case}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert len(lines) == 1 and re.search(expect, lines[0]), f"{case}: {proc.stderr}"
    after = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    assert after == before, f"{case}: something was written: {sorted(set(after) ^ set(before))}"


def test_report_timings():
    """Not a check: prints how long the stages took (pytest -s), for the README."""
    if TIMINGS:
        print("\ncontainer e2e timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in TIMINGS.items()))
