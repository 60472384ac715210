"""The cuda image: its host-driver floor check, and the image itself built and smoke-tested on a GPU-less machine.

Part 1 (no engine needed) runs the real entrypoints/lib.sh + driver-check.sh against fake /proc/driver/nvidia/version
files and a fake nvidia-smi (no NVIDIA driver exists here): a too-old driver stops with one line naming the driver
found, the minimum and the tag to use instead.

Part 2 (real Docker engine, like tests/test_container.py) builds the cuda image through compose exactly as
`make build-cuda` does (plain Debian base + torch and its nvidia-* wheels from PyPI, hashed), then checks inside it:
torch is the CUDA build, the CUDA libraries from the wheels load (ctypes), `hvtune check` passes, the tiny demo
trains on the CPU, and `hvtune compare` finds that run identical or equivalent to the same run in the cpu image.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

import test_container as tc

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "entrypoints" / "lib.sh"
# the same engine and cpu image as tests/test_container.py (pytest finds fixtures among module attributes)
engine = tc.engine
image = tc.image
DRIVER_CHECK = ROOT / "entrypoints" / "driver-check.sh"
PROC_LINE = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  {v}  Tue Mar  5 22:23:56 UTC 2024\nGCC version:  gcc 12\n"
OPEN_LINE = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {v}  Release Build  (dvs-builder@U16)  2025\n"


def floors() -> dict[str, tuple[str, str]]:
    """tag -> (CUDA version, minimum driver), read from the script's own table."""
    rows = re.search(r"HV_CUDA_FLOORS=\(\n(.*?)\n\)", DRIVER_CHECK.read_text(), re.S)[1]
    return {t: (c, d) for t, c, d in (line.strip().strip('"').split() for line in rows.splitlines())}


def gpu_check(tmp_path: Path, *, tag: str, version_file: str | None, smi_version: str | None = None, vendor="cuda"):
    """Run lib.sh's hv_check_gpu as an entrypoint does, with a fake nvidia-smi that sees one GPU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        'case "$1" in -L) echo "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-0)";;\n'
        f"  --query-gpu=driver_version) {'echo ' + smi_version if smi_version else 'exit 9'};; esac\n"
    )
    smi.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HVTUNE_VENDOR": vendor,
        "HVTUNE_IMAGE_TAG": tag,
        "HVTUNE_NVIDIA_VERSION_FILE": version_file or str(tmp_path / "absent"),
        "HVTUNE_KFD_PATH": str(tmp_path / "kfd"),
    }
    script = f'set -euo pipefail; source "{LIB}"; hv_check_gpu; echo "gpu check passed"'  # strict, as the entrypoints
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)


def fake_proc(tmp_path: Path, version: str, template: str = PROC_LINE) -> str:
    path = tmp_path / "version"
    path.write_text(template.format(v=version))
    return str(path)


def test_driver_floors_are_the_documented_ones():
    assert floors() == {"cuda": ("13.0", "580.65.06"), "cuda12": ("12.6", "525.60.13")}
    doc = (ROOT / "docs" / "CONTAINERS.md").read_text()
    for tag, (cuda, driver) in floors().items():
        assert re.search(rf"`{tag}`.*CUDA {re.escape(cuda)}.*{re.escape(driver)}", doc), f"{tag} floor not in the doc"


@pytest.mark.parametrize("template", [PROC_LINE, OPEN_LINE], ids=["proprietary", "open-kernel-module"])
def test_too_old_driver_stops_with_one_line_naming_the_tag_to_use(tmp_path, template):
    proc = gpu_check(tmp_path, tag="cuda", version_file=fake_proc(tmp_path, "550.54.15", template))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.fullmatch(
        r"\[bash\] error: NVIDIA driver 550\.54\.15 is too old for the hvtune:cuda image \(CUDA 13\.0 needs driver "
        r">= 580\.65\.06\): use the hvtune:cuda12 image .*COMPOSE_PROFILES=cuda12.*",
        lines[0],
    ), lines[0]
    assert "gpu check passed" not in proc.stdout


def test_driver_below_every_tag_says_update(tmp_path):
    proc = gpu_check(tmp_path, tag="cuda12", version_file=fake_proc(tmp_path, "470.82.01"))
    assert proc.returncode == 2
    assert "NVIDIA driver 470.82.01 is too old for the hvtune:cuda12 image" in proc.stderr
    assert "update the host driver to >= 525.60.13" in proc.stderr


@pytest.mark.parametrize(("tag", "version"), [("cuda", "580.65.06"), ("cuda", "590.1"), ("cuda12", "535.104.05")])
def test_new_enough_driver_passes(tmp_path, tag, version):
    proc = gpu_check(tmp_path, tag=tag, version_file=fake_proc(tmp_path, version))
    assert proc.returncode == 0, proc.stderr
    assert "gpu check passed" in proc.stdout


def test_nvidia_smi_is_asked_when_proc_has_no_version(tmp_path):
    proc = gpu_check(tmp_path, tag="cuda", version_file=None, smi_version="570.172.08")
    assert proc.returncode == 2
    assert "NVIDIA driver 570.172.08 is too old for the hvtune:cuda image" in proc.stderr


def test_unknown_driver_version_does_not_block(tmp_path):
    """No version file and nvidia-smi cannot say: the driver check steps aside (the GPU check still runs)."""
    proc = gpu_check(tmp_path, tag="cuda", version_file=None, smi_version=None)
    assert proc.returncode == 0, proc.stderr
    assert "gpu check passed" in proc.stdout


def test_rocm_without_kfd_stops_with_one_line(tmp_path):
    proc = gpu_check(tmp_path, tag="rocm", version_file=None, vendor="rocm")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and f"({tmp_path}/kfd missing)" in proc.stderr, proc.stderr
    assert "AMD GPU Driver 30.10" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# Part 2: the cuda image on a real engine.

SMOKE = r"""
import ctypes, glob, json, os, sys, sysconfig
import torch
site = sysconfig.get_paths()["purelib"]
def lib(pattern):
    found = sorted(glob.glob(os.path.join(site, "nvidia", "**", pattern), recursive=True))
    assert found, f"{pattern} not in the nvidia wheels"
    ctypes.CDLL(found[0])
    return os.path.relpath(found[0], site)
print(json.dumps({
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version(),
    "arch_flags": torch._C._cuda_getArchFlags(),
    "cuda_available": torch.cuda.is_available(),
    "libcudart": lib("libcudart.so*"),
    "libcublas": lib("libcublas.so*"),
    "libcublasLt": lib("libcublasLt.so*"),
}))
"""


@pytest.fixture(scope="module")
def cuda_image(engine) -> str:
    env = tc.clean_env(COMPOSE_PROFILES="cuda", CUDA_BASE_IMAGE=engine, HVTUNE_IMAGE=tc.IMAGE_NAME)
    env.update(PUID=str(tc.PUID), PGID=str(tc.PGID))
    t0 = time.monotonic()
    build = ["docker", "compose", "--env-file", os.devnull, "-p", tc.PROJECT, "build", "cache"]
    tc.run(build, env=env, cwd=ROOT, timeout=3600)
    tc.TIMINGS["cuda image build"] = time.monotonic() - t0
    name = f"{tc.IMAGE_NAME}:cuda"
    inspect = json.loads(tc.run(["docker", "image", "inspect", name]).stdout)[0]
    labels = inspect["Config"]["Labels"]
    assert labels["io.hvtune.vendor"] == "cuda" and labels["io.hvtune.torch.version"] == tc.TORCH_VERSION
    assert labels["io.hvtune.torch.lock"] == "requirements-cuda-py311.lock"
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in inspect["Config"]["Env"]
    tc.TIMINGS["cuda image size (GB)"] = inspect["Size"] / 1e9
    return name


@pytest.mark.slow
@pytest.mark.container
def test_cuda_image_smoke_and_demo_matches_the_cpu_image(cuda_image, image, tmp_path):
    proc = tc.docker_run(cuda_image, "python", "-c", SMOKE)
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["torch"].startswith("2.13.0") and info["cuda"] == "13.0", info
    assert info["cudnn"] and not info["cuda_available"], info
    assert "sm_80" in info["arch_flags"] and "sm_90" in info["arch_flags"], info
    print("cuda image:", info)

    # the image's own entrypoint on a host with a too-old driver: one line, exit 2, the tag to use instead
    fake = tmp_path / "nvidia-version"
    fake.write_text(PROC_LINE.format(v="550.54.15"))
    proc = tc.docker_run(
        cuda_image,
        "train",
        mounts=[(fake, "/fake/version", "ro")],
        env=["HVTUNE_NVIDIA_VERSION_FILE=/fake/version"],
        check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        "[train] error: NVIDIA driver 550.54.15 is too old for the hvtune:cuda image (CUDA 13.0 needs driver >= "
        "580.65.06): use the hvtune:cuda12 image (CUDA 12.6, driver >= 525.60.13; compose: COMPOSE_PROFILES=cuda12) "
        "or update the host driver"
    ), proc.stderr

    runs_root = tmp_path / "runs"  # both runs under one folder the container user can enter (tmp_path is 0700)
    runs = {}
    for name, img in (("cpu", image), ("cuda", cuda_image)):
        out = runs_root / name
        out.mkdir(parents=True)
        tc.chown_tree(runs_root)
        t0 = time.monotonic()
        proc = tc.docker_run(img, "hvtune", "demo", "--dir", "/out/demo", "--steps", "8", mounts=[(out, "/out", "rw")])
        tc.TIMINGS[f"demo in the {name} image"] = time.monotonic() - t0
        record = re.search(r"run record\s+(\S+)", proc.stdout)[1]
        runs[name] = Path(record).parent.relative_to("/out")
        config = re.search(r"config\s+(/\S+)", proc.stdout)[1]
        # `hvtune check` on that project, in that image (the entrypoints' GPU check is what stops a GPU-less start)
        check = tc.docker_run(img, "hvtune", "check", "--config", config, mounts=[(out, "/out", "rw")], check=False)
        assert check.returncode == 0, f"hvtune check in {img}:\n{check.stdout[-2000:]}\n{check.stderr[-2000:]}"

    both = [(runs_root, "/runs", "rw")]
    proc = tc.docker_run(
        image, "hvtune", "compare", f"/runs/cpu/{runs['cpu']}", f"/runs/cuda/{runs['cuda']}", mounts=both, check=False
    )
    print(proc.stdout)
    assert proc.returncode in (0, 3), f"cpu and cuda image runs differ:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    verdict = "identical" if proc.returncode == 0 else "equivalent"
    assert f"verdict: {verdict.upper()}" in proc.stdout, proc.stdout  # measured: IDENTICAL (docs/REPRODUCIBILITY.md)
    print(
        f"\ncpu vs cuda image: {verdict}; "
        + ", ".join(f"{k} {v:.1f}" for k, v in tc.TIMINGS.items() if "cuda" in k or "demo" in k)
    )
