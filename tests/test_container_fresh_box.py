"""A fresh box, walked as README.md and docs/CONTAINERS.md tell a user (issue 28), on a real engine with the cpu image
that tests/test_container.py builds: another PUID rebuilds no layer; PUID=0 is refused with the way out, and after
fixing .env the named volumes a root run left behind are repaired; a root-owned ./outputs stops `make train` before
`cache` downloads or encodes anything, and the first `make train` builds the missing image without asking a registry;
the cpu image holds no layer with the torch wheel; `make train` exits as the docs say.

Several worktrees may share one engine: HVTUNE_TEST_IMAGE names this run's images and projects.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import test_container
from test_container import IMAGE_NAME, PROJECT, ROOT, TORCH_WHEEL, clean_env, memlock_limit, run, write_project
from test_container_runtime import chown_all, compose_up_flags, owners

engine, image = test_container.engine, test_container.image

pytestmark = [pytest.mark.slow, pytest.mark.container]


def write_env(path: Path, dirs: dict[str, Path], **extra: str) -> Path:
    """The user's .env: cpu profile, their folders as bind mounts, models/cache as named volumes unless set."""
    lines = {
        "COMPOSE_PROFILES": "cpu",
        "HVTUNE_IMAGE": IMAGE_NAME,
        "DATASET_DIR": str(dirs["datasets"]),
        "MODELS_DIR": str(dirs["models"]),
        "OUTPUT_DIR": str(dirs["outputs"]),
        "HVTUNE_ENV_FILE": str(path),
        "HVTUNE_CONFIG": "/data/datasets/config.json",
        "HF_HUB_OFFLINE": "1",
        "MEMLOCK_LIMIT": str(memlock_limit()),
        **extra,
    }
    path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    return path


def volume_owners(volume: str, image: str) -> set[str]:
    proc = run(["docker", "run", "--rm", "-v", f"{volume}:/v", image, "find", "/v", "-printf", r"%U:%G\n"])
    return set(proc.stdout.split())


def test_another_puid_rebuilds_no_layer(engine, image):
    def build(puid: str) -> tuple[str, str]:
        env = clean_env(COMPOSE_PROFILES="cpu", CPU_BASE_IMAGE=engine, HVTUNE_IMAGE=IMAGE_NAME, PUID=puid, PGID=puid)
        proc = run(["docker", "compose", "--env-file", os.devnull, "-p", PROJECT, "build", "cache"], env=env, cwd=ROOT)
        return run(["docker", "image", "inspect", "-f", "{{.Id}}", image]).stdout.strip(), proc.stdout + proc.stderr

    default_id, _ = build("1000")  # the image as the source is now (the fixture may have built an older checkout)
    other_id, out = build("1234")
    rebuilt = re.findall(r"^Step \d+/\d+ : (.*)\n ---> Running in", out, re.M)
    print(f"\nPUID=1234 build: {out.count('Using cache')} steps from cache, {len(rebuilt)} rebuilt {rebuilt}")
    assert not rebuilt, f"layers rebuilt for another uid: {rebuilt}"
    assert other_id == default_id


def test_puid0_refused_then_fixed_env_repairs_the_named_volume(image, tmp_path):
    dirs = write_project(tmp_path / "p", "/data", image)
    project = f"{PROJECT}-puid0"
    env = clean_env(COMPOSE_PROFILES="cpu")
    env_file = tmp_path / "user.env"
    compose = ["docker", "compose", "-p", project, "--env-file", str(env_file)]
    try:
        # a root user follows "PUID = `id -u`": refused at once, with the values to write instead
        write_env(env_file, dirs, PUID="0", PGID="0")
        proc = run([*compose, "up", "--abort-on-container-failure", "cache"], env=env, cwd=ROOT, check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, out[-3000:]
        assert re.search(r"PUID=0 would train as root: set PUID and PGID .* e\.g\. PUID=1000 PGID=1000", out), out
        # the volume left root-owned by a run that did run as root (HVTUNE_RUN_AS_ROOT=1, or an older image)
        write_env(env_file, dirs, PUID="0", PGID="0", HVTUNE_RUN_AS_ROOT="1")
        run([*compose, "up", "--abort-on-container-failure", "cache"], env=env, cwd=ROOT, timeout=1800)
        assert "0:0" in volume_owners(f"{project}_cache", image)
        # fixed .env: another uid, the user's own folders chowned by the user; the named volume is the container's
        write_env(env_file, dirs, PUID="1234", PGID="1235")
        chown_all(dirs["datasets"].parent, 1234, 1235)
        up = [*compose, "up", *compose_up_flags(), "train"]
        proc = run(up, env=env, cwd=ROOT, timeout=1800)
        out = proc.stdout + proc.stderr
        assert "/data/{models,cache} handed to uid:gid 1234:1235" not in out, "MODELS_DIR is a host path: not chowned"
        assert "/data/{cache} handed to uid:gid 1234:1235" in out, out[-3000:]
        assert volume_owners(f"{project}_cache", image) == {"1234:1235"}
        assert owners(dirs["outputs"]) == {(1234, 1235)}
        assert list(dirs["outputs"].rglob("pytorch_lora_weights.safetensors")), out[-3000:]
    finally:
        run([*compose, "down", "-v", "--remove-orphans"], env=env, cwd=ROOT, check=False)


def test_root_owned_outputs_stop_the_first_make_train_before_cache_without_a_pull(engine, image, tmp_path):
    dirs = write_project(tmp_path / "p", "/data", image)
    os.chown(dirs["outputs"], 0, 0)
    dirs["outputs"].chmod(0o755)
    fresh = f"{IMAGE_NAME}-first"  # not built yet: the first `make train` of a fresh box builds it
    run(["docker", "image", "rm", "-f", f"{fresh}:cpu"], check=False)
    env_file = write_env(tmp_path / "user.env", dirs, HVTUNE_IMAGE=fresh, PUID="1000", PGID="1000")
    project = f"{PROJECT}-outputs"
    compose = f"docker compose -p {project} --env-file {env_file}"
    env = clean_env(COMPOSE_PROFILES="cpu", CPU_BASE_IMAGE=engine)
    assert (ROOT / "docker" / "wheels" / TORCH_WHEEL).exists(), "the image fixture put the wheel there"
    try:
        proc = run(["make", "--no-print-directory", "train", f"COMPOSE={compose}"], env=env, cwd=ROOT, check=False)
        out = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", proc.stdout + proc.stderr)
        assert run(["docker", "image", "inspect", f"{fresh}:cpu"], check=False).returncode == 0, out[-3000:]
        assert not re.search(r"(?i)pull(ing)? |pull access|registry-1|docker\.io", out), f"a pull was tried:\n{out}"
        errors = [ln for ln in out.splitlines() if "error:" in ln]
        want = "output folder /data/outputs is not writable by uid:gid 1000:1000: "
        want += f"run 'sudo chown -R 1000:1000 {dirs['outputs']}'"
        assert len(errors) == 1 and want in errors[0], out[-3000:]
        assert "building caches" not in out and "[fetch-encoders]" not in out, "cache started before the check"
        assert proc.returncode == 2, f"make train: docs say 2 for any failure, got {proc.returncode}"
        # the documented compose line itself: cache failed, so `up` reports the dependency with 1 (compose's code)
        raw = run([*compose.split(), "up", *compose_up_flags(), "train"], env=env, cwd=ROOT, check=False)
        assert raw.returncode == 1, raw.stdout[-2000:] + raw.stderr[-2000:]
        assert not list(dirs["outputs"].iterdir()), "nothing written"
    finally:
        run([*compose.split(), "down", "-v", "--remove-orphans"], env=env, cwd=ROOT, check=False)
        run(["docker", "image", "rm", "-f", f"{fresh}:cpu"], check=False)


def test_cpu_image_has_no_torch_wheel_layer(image):
    history = run(["docker", "history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", image]).stdout
    wheel_layers = [ln for ln in history.splitlines() if "/tmp/wheels" in ln]
    assert not wheel_layers, f"a layer holds the torch wheel: {wheel_layers}"
    size = int(run(["docker", "image", "inspect", "-f", "{{.Size}}", image]).stdout)
    wheel = (ROOT / "docker" / "wheels" / TORCH_WHEEL).stat().st_size
    print(f"\ncpu image {size / 1e6:.0f} MB; the wheel it no longer carries: {wheel / 1e6:.0f} MB")
    labels = json.loads(run(["docker", "image", "inspect", "-f", "{{json .Config.Labels}}", image]).stdout)
    assert labels["io.hvtune.torch.version"] == "2.13.0"
    check = run(["docker", "run", "--rm", image, "python", "-c", "import torch; print(torch.__version__)"])
    assert check.stdout.strip() == "2.13.0+cpu"


def test_cpu_threads_in_the_image_sleep_and_follow_the_cpu_quota(image):
    """docker run --cpus 1 on a many-core host: one torch thread, not one per host core; waits sleep (PASSIVE)."""
    probe = "import hvtune, os, torch; print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads())"
    limited = run(["docker", "run", "--rm", "--cpus", "1", image, "python", "-c", probe]).stdout.split()
    assert limited == ["PASSIVE", "1"], limited
    free = run(["docker", "run", "--rm", image, "python", "-c", probe]).stdout.split()
    assert free[0] == "PASSIVE" and int(free[1]) >= 1
