"""Pins of the images, checked without an engine: every base image by digest (as far as `make pin` could resolve it),
docker/pin.sh pins every vendor's base (run against a stand-in registry), and every wheel an image installs is
checked against a sha256 (`pip install --require-hashes`), torch included. The known gaps are listed here by name, so
a new unpinned base or unhashed wheel fails; HVTUNE_REQUIRE_PINS=1 (a release machine with registry access, after
`make pin` and `make lock`) allows none."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

from test_container_static import CUDA_LOCK, DOCKER, PROFILES, compose_config, lock_entries, pyproject_pins

ROOT = Path(__file__).resolve().parents[1]
VENDORS = ("CUDA", "CUDA12", "ROCM", "CPU")
STRICT = os.environ.get("HVTUNE_REQUIRE_PINS") == "1"
# No registry is reachable from the machine these pins were made on, so `make pin` could resolve none of them
# (docs/CONTAINERS.md, "Base images by digest"); CI builds from a local debootstrapped base instead.
BASES_WITHOUT_DIGEST = set() if STRICT else {"CUDA", "CUDA12", "ROCM", "CPU"}
# cuda12 and rocm take torch from download.pytorch.org, unreachable there, so no hash of those wheels is committed
TORCH_WITHOUT_HASH = set() if STRICT else {"cuda12", "rocm"}
CPU_TORCH_LOCK = DOCKER / "requirements-torch-cpu.lock"
DIGEST = r"sha256:[0-9a-f]{64}"


def base_defaults(text: str) -> dict[str, str]:
    return {v: m[1] for v in VENDORS if (m := re.search(rf"\${{{v}_BASE_IMAGE:-([^}}]*)}}", text))}


def test_every_base_image_is_tag_at_digest_where_make_pin_resolved_it():
    defaults = base_defaults((DOCKER / "compose.vendors.yaml").read_text())
    assert set(defaults) == set(VENDORS), f"a vendor without a pinnable base default: {set(VENDORS) - set(defaults)}"
    unpinned = set()
    for vendor, ref in defaults.items():
        m = re.fullmatch(rf"([a-z0-9./-]+):([A-Za-z0-9._-]+)(@{DIGEST})?", ref)
        assert m and m[2] != "latest", f"{vendor}: {ref!r} is not tag[@sha256:<64 hex>]"
        if not m[3]:
            unpinned.add(vendor)
    assert unpinned <= BASES_WITHOUT_DIGEST, f"base images without a digest: {sorted(unpinned)}; run `make pin`"
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert set(re.findall(r"^ARG BASE_IMAGE=(\S+)", dockerfile, re.M)) == {defaults["CPU"]}, "the Dockerfile default"
    froms = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    stages = set(re.findall(r"^FROM \S+ AS (\S+)", dockerfile, re.M))
    assert froms[0] == "${BASE_IMAGE}" and set(froms[1:]) <= stages, (
        f"every FROM is the pinned base or a stage: {froms}"
    )


def test_pin_sh_writes_a_digest_for_every_vendor_and_the_dockerfile(tmp_path):
    """docker/pin.sh against a stand-in registry (a `curl` on PATH): each base, cuda included, gets tag@digest."""
    work = tmp_path / "repo"
    (work / "docker").mkdir(parents=True)
    for name in ("pin.sh", "compose.vendors.yaml", "Dockerfile"):
        shutil.copy2(DOCKER / name, work / "docker" / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "curl"
    fake.write_text(
        "#!/bin/sh\n"
        'for a; do url=$a; done\ncase "$url" in\n'
        '  *auth.docker.io*) echo \'{"token": "t"}\' ;;\n'
        '  *) printf "HTTP/1.1 200 OK\\r\\ndocker-content-digest: sha256:%s\\r\\n" '
        '$(printf %s "$url" | sha256sum | cut -c1-64) ;;\nesac\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run([str(work / "docker" / "pin.sh"), "--strict"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pinned = base_defaults((work / "docker" / "compose.vendors.yaml").read_text())
    originals = base_defaults((DOCKER / "compose.vendors.yaml").read_text())
    for vendor in VENDORS:
        assert re.fullmatch(rf"{re.escape(originals[vendor].split('@')[0])}@{DIGEST}", pinned[vendor]), pinned
    assert f"ARG BASE_IMAGE={pinned['CPU']}\n" in (work / "docker" / "Dockerfile").read_text()
    # a second run changes nothing (idempotent, and the tag is kept in front of the digest)
    again = subprocess.run([str(work / "docker" / "pin.sh")], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and base_defaults((work / "docker" / "compose.vendors.yaml").read_text()) == pinned


def test_every_wheel_of_every_image_is_installed_by_hash():
    dockerfile = "\n".join(ln for ln in (DOCKER / "Dockerfile").read_text().splitlines() if not ln.startswith("#"))
    installs = re.findall(r"pip install ([^;&\n]*)", dockerfile)
    unhashed = [i for i in installs if "--require-hashes" not in i]
    # the project itself (local source, no download) and the index install of TORCH_WITHOUT_HASH
    assert sorted(unhashed) == sorted(
        [
            "--no-deps --no-build-isolation /opt/hvtune/src \\",
            '"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"',
        ]
    ), unhashed
    torch = pyproject_pins()["torch"]
    for profile in PROFILES:
        args = compose_config(profile)["services"]["cache"]["build"]["args"]
        if args["TORCH_INDEX_URL"]:
            assert profile in TORCH_WITHOUT_HASH, f"{profile}: torch from {args['TORCH_INDEX_URL']} without a hash"
        elif args.get("TORCH_LOCK"):
            assert args["TORCH_LOCK"] == CUDA_LOCK.name and lock_entries(CUDA_LOCK)["torch"][0] == torch
        else:  # the cpu image: the wheel from docker/wheels/, checked against docker/requirements-torch-cpu.lock
            version, hashes = lock_entries(CPU_TORCH_LOCK)["torch"]
            assert version == f"{torch}+cpu" and len(hashes) == 1 and re.fullmatch(r"[0-9a-f]{64}", hashes[0])
    wheel = DOCKER / "wheels" / f"torch-{torch}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    if wheel.exists():  # the wheel `make build-cpu` fetched is the one the lock names
        assert hashlib.sha256(wheel.read_bytes()).hexdigest() == lock_entries(CPU_TORCH_LOCK)["torch"][1][0]
    assert "!docker/requirements-torch-cpu.lock" in (ROOT / ".dockerignore").read_text().splitlines()
