"""Issue 6 proofs on the CPU: same run twice is identical, resume is identical, 2 processes x batch 1 is
equivalent to 1 process x batch 2, another seed is different."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_hvtune

pytestmark = pytest.mark.slow
STEPS = ["--max_train_steps=6", "--validation_disable=true", "--checkpointing_steps=3"]


def _train(config: Path, out: Path, *extra: str) -> None:
    r = run_hvtune("train", "--config", str(config), f"--output_dir={out}", *STEPS, *extra)
    assert r.returncode == 0, r.stderr[-3000:]


def _compare(a: Path, b: Path, *flags: str, cwd: Path | None = None):
    """`hvtune compare` in `cwd` (default: b's folder, so its loss plot never lands in the repository)."""
    return run_hvtune("compare", str(a), str(b), *flags, cwd=cwd or b.parent)


@pytest.fixture(scope="module")
def reference_run(demo_project, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    _train(demo_project, out)
    return out


def test_same_config_twice_is_identical(demo_project, reference_run, tmp_path):
    _train(demo_project, tmp_path / "again")
    r = _compare(reference_run, tmp_path / "again", cwd=tmp_path)
    assert r.returncode == 0 and "verdict: IDENTICAL" in r.stdout, r.stdout + r.stderr
    assert (tmp_path / "compare_loss.png").stat().st_size > 0  # where the user is, not inside a run
    assert not (tmp_path / "again" / "compare_loss.png").exists()


def test_compare_gives_its_verdict_when_the_picture_cannot_be_written(demo_project, reference_run, tmp_path):
    """Issue 13.9: the picture's folder cannot be written (here: it is a file, which stops root too): the verdict
    still comes, and the failure is one warning line."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    r = _compare(reference_run, reference_run, f"--plot={blocker / 'compare_loss.png'}", cwd=tmp_path)
    assert r.returncode == 0 and "verdict: IDENTICAL" in r.stdout, r.stdout + r.stderr
    assert "warning: loss overlay not written" in r.stdout and "Traceback" not in r.stderr


def test_resume_is_identical(demo_project, reference_run, tmp_path):
    """Continue from the reference run's step-3 checkpoint (as after a crash) and finish: same LoRA bytes."""
    out = tmp_path / "resumed"
    kept = sorted(p.name for p in (reference_run / "checkpoints").iterdir())
    assert kept == ["checkpoint-000003", "checkpoint-000006"]  # the last step is kept before its validation
    shutil.copytree(reference_run / "checkpoints" / kept[0], out / "checkpoints" / kept[0])
    shutil.copytree(reference_run / "logs", out / "logs", ignore=shutil.ignore_patterns("tensorboard"))
    _train(demo_project, out, "--resume_from_checkpoint=latest")
    r = _compare(reference_run, out)
    assert r.returncode == 0 and "IDENTICAL" in r.stdout, r.stdout + r.stderr


def test_two_processes_batch_1_equivalent_to_one_process_batch_2(demo_project, reference_run, tmp_path):
    """Two real processes (gloo), launched by the container's own train entrypoint (NUM_PROCESSES=2 ->
    accelerate launch), each with batch 1, against one process with batch 2."""
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "datasets").symlink_to(demo_project.parent.parent / "datasets" / "clips")
    out = tmp_path / "data" / "ddp"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(root / "app"),
        "HVTUNE_DATA_ROOT": str(tmp_path / "data"),
        "HVTUNE_CONFIG": str(demo_project),
        "HVTUNE_OUTPUT_DIR": str(out),
        "NUM_PROCESSES": "2",
        "MAIN_PROCESS_PORT": "29517",
    }
    r = subprocess.run(
        ["bash", str(root / "entrypoints" / "train"), *STEPS, "--train_batch_size=1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes" in r.stderr
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    c = _compare(reference_run, out)
    assert c.returncode in (0, 3) and ("EQUIVALENT" in c.stdout or "IDENTICAL" in c.stdout), c.stdout
    print(c.stdout)


def test_another_seed_is_different(demo_project, reference_run, tmp_path):
    _train(demo_project, tmp_path / "seed1", "--seed=1")
    r = _compare(reference_run, tmp_path / "seed1")
    assert r.returncode == 4 and "verdict: DIFFERENT" in r.stdout and "seed" in r.stdout
