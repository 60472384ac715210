"""What the container front door relies on, tested without Docker: the shipped .env.example never overrides a config
file, `hvtune config get` gives the entrypoints resolved keys (and entrypoints/lib.sh uses it), no route to the hub is
one line with exit 2, and training without a TTY prints progress lines while it runs."""

from __future__ import annotations

import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import run_hvtune
from hvtune.config.settings import load_config
from hvtune.output.progress import TrainProgress

ROOT = Path(__file__).resolve().parents[1]
HVTUNE_BIN = Path(sys.executable).parent


def env_file_values(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file as compose reads them (comments and blank lines skipped)."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value
    return values


def write_config(folder: Path, **keys) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(keys))
    return path


def test_env_example_never_overrides_the_config_file_but_a_deliberate_env_line_wins(tmp_path):
    shipped = env_file_values(ROOT / ".env.example")
    config = write_config(tmp_path, max_train_steps=4, model_flavour="i2v-480p", instance_data_dir=str(tmp_path))

    resolved = load_config(config, env=shipped, check_paths=False)
    assert resolved.train.max_train_steps == 4 and resolved.train.model_flavour == "i2v-480p"
    assert resolved.sources["max_train_steps"] == f"file:{config}"

    on_purpose = {**shipped, "HVTUNE_MAX_TRAIN_STEPS": "1000", "HVTUNE_LEARNING_RATE": ""}
    resolved = load_config(config, env=on_purpose, check_paths=False)
    assert resolved.train.max_train_steps == 1000, "a value the user sets in .env still wins"
    assert resolved.sources["max_train_steps"] == "env:HVTUNE_MAX_TRAIN_STEPS"
    assert resolved.sources["learning_rate"] == "default", "an empty `KEY=` line (compose passes '') is unset"
    assert any("HVTUNE_MAX_TRAIN_STEPS=1000" in n and "overrides 4" in n for n in resolved.notices), resolved.notices


@pytest.mark.slow
def test_check_shows_that_the_env_line_won_over_the_file(demo_project, tmp_path):
    config = json.loads(demo_project.read_text())
    project = demo_project.parent / "with-steps.json"
    project.write_text(json.dumps({**config, "max_train_steps": 4}))
    proc = run_hvtune("check", "--config", str(project), env={"HVTUNE_MAX_TRAIN_STEPS": "1000"})
    assert proc.returncode == 0, proc.stderr
    row = next(ln for ln in proc.stdout.splitlines() if ln.split()[:1] == ["max_train_steps"])
    assert row.split()[1:] == ["1000", "env:HVTUNE_MAX_TRAIN_STEPS"], row
    assert f"overrides 4 from {project}" in proc.stderr


def test_config_get_prints_resolved_keys_with_their_source(tmp_path):
    config = write_config(tmp_path, dataset_backend_config="multidatabackend.json", max_train_steps=4)
    proc = run_hvtune(
        "config", "get", "--config", str(config), "data_backend_config", "max_train_steps", "output_dir",
        "resume_from_checkpoint", env={"HVTUNE_OUTPUT_DIR": "/data/outputs"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"data_backend_config\tfile:{config}\tmultidatabackend.json",
        f"max_train_steps\tfile:{config}\t4",
        "output_dir\tenv:HVTUNE_OUTPUT_DIR\t/data/outputs",
        "resume_from_checkpoint\tdefault\tlatest",
    ]
    bad = run_hvtune("config", "get", "--config", str(config), "max_train_step")
    assert bad.returncode == 2 and "max_train_step = None: not a training key" in bad.stderr


def shell_env(data_root: Path, **env: str) -> dict[str, str]:
    """What entrypoints/lib.sh hv_env decides, run by bash on this machine (hvtune from this venv)."""
    script = (
        f"source {ROOT / 'entrypoints' / 'lib.sh'}; hv_env; "
        'printf "%s\\n" "dataset=$HV_DATASET_DIR" "output=$HV_OUTPUT_DIR" "cache=$HV_CACHE_DIR" '
        '"backend=$HV_KEY_data_backend_config"'
    )
    full = {**os.environ, "PATH": f"{HVTUNE_BIN}:{os.environ['PATH']}", "HVTUNE_DATA_ROOT": str(data_root), **env}
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=full, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines())


def test_entrypoints_take_resolved_keys_from_hvtune(tmp_path):
    # the seed project's spelling, dataset_backend_config: the dataset comes from the backend file, not a folder
    config = write_config(tmp_path / "config", dataset_backend_config="multidatabackend.json", output_dir="runs/a")
    got = shell_env(tmp_path, HVTUNE_CONFIG=str(config))
    assert got["backend"] == "multidatabackend.json"
    assert got["dataset"] == "", "a backend config means no instance_data_dir check"
    assert got["output"] == "runs/a", "a value from the config file is kept as hvtune reads it"
    assert got["cache"] == f"{tmp_path}/cache/hvtune", "a key left at hvtune's default takes the container layout"

    plain = write_config(tmp_path / "plain", output_dir="runs/a")
    got = shell_env(tmp_path, HVTUNE_CONFIG=str(plain), HVTUNE_OUTPUT_DIR="/elsewhere")
    assert (got["output"], got["dataset"]) == ("/elsewhere", f"{tmp_path}/datasets"), "env wins; default dataset dir"

    (tmp_path / "config" / "config.json").write_text("{not json")
    full = {**os.environ, "PATH": f"{HVTUNE_BIN}:{os.environ['PATH']}", "HVTUNE_DATA_ROOT": str(tmp_path)}
    proc = subprocess.run(
        ["bash", "-c", f"source {ROOT / 'entrypoints' / 'lib.sh'}; hv_env; echo reached"],
        capture_output=True, text=True, env={**full, "HVTUNE_CONFIG": str(config)}, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "malformed JSON at line 1" in proc.stderr and "reached" not in proc.stdout


def test_unreachable_hub_is_one_line_exit_2(tmp_path):
    config = write_config(tmp_path, instance_data_dir=str(tmp_path))
    # loopback port 9 (discard) refuses: the same path as no route, DNS failure or a dead proxy
    env = {"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = run_hvtune("fetch", "--config", str(config), env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    line = lines[0]
    assert line.startswith("error: cannot reach the Hugging Face hub at http://127.0.0.1:9"), line
    for fix in ("HUNYUANVIDEO_TEXT_ENCODER_PATH", "HF_HUB_OFFLINE=1", "HTTPS_PROXY"):
        assert fix in line, line


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_without_a_tty_prints_a_line_per_interval():
    stream, clock = io.StringIO(), FakeClock()
    progress = TrainProgress(100, 0, stream=stream, interval=30, clock=clock)
    for _ in range(100):
        clock.now += 2.0
        progress.update(loss=0.5, lr=1e-4, seconds=2.0)
    progress.close()
    lines = stream.getvalue().splitlines()
    # the first step, then one line per 30 s (every 15 steps of 2 s), and the last step
    steps = [int(re.search(r" (\d+)/100 steps", ln)[1]) for ln in lines]
    assert steps == [1, 16, 31, 46, 61, 76, 91, 100], lines
    assert "\r" not in stream.getvalue()
    assert re.fullmatch(
        r"train:  16% 16/100 steps \| loss 0\.5000 \| lr 1\.00e-04 \| 2\.00 s/step \| ETA 0:02:48 \| "
        r"peak mem [\d.]+ GiB RSS",
        lines[1],
    ), lines[1]


@pytest.mark.slow
def test_training_without_a_tty_shows_progress_lines_while_it_runs(demo_project, tmp_path):
    """A pipe, as under compose or `docker logs`: complete progress lines arrive during training, not at its end."""
    app = str(ROOT / "app")
    args = ["--max_train_steps=100000", "--validation_disable=true", "--checkpointing_steps=100000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "hvtune", "train", "--config", str(demo_project), f"--output_dir={tmp_path}", *args],
        env={**os.environ, "PYTHONPATH": app, "HVTUNE_PROGRESS_SECONDS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    seen: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while len(seen) < 3 and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            m = re.match(
                r"train: +\d+% (\d+)/100000 steps \| loss [\d.]+ \| lr \S+ \| [\d.]+ s/step \| ETA \S+ \|", line
            )
            if m:
                assert proc.poll() is None, "progress must show while training runs"
                seen.append(int(m[1]))
        assert len(seen) >= 3, f"progress lines seen while training: {seen}"
        assert seen == sorted(seen) and seen[0] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
