"""Several boxes (issue 23.3), on the host without docker: the containers' own entrypoints with accelerate's
NUM_MACHINES / MACHINE_RANK / MAIN_PROCESS_IP / MAIN_PROCESS_PORT. A wrong address is one line within the stated
timeout (not a silent rendezvous wait), a bad combination is one line before anything is written, and two
"machines" on localhost meet and train one run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["--max_train_steps=4", "--validation_disable=true", "--checkpointing_steps=4", "--train_batch_size=1"]
TIMEOUT_S = 5


def _entrypoint_env(tmp_path: Path, config: Path | None, **machines: str) -> dict[str, str]:
    """The environment a container gets, with the data root in tmp_path; the datasets come from the config."""
    (tmp_path / "data").mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT / "app"),
        "HVTUNE_DATA_ROOT": str(tmp_path / "data"),
        "HVTUNE_RENDEZVOUS_TIMEOUT": str(TIMEOUT_S),
        **machines,
    }
    if config is not None:
        env["HVTUNE_CONFIG"] = str(config)
    return env


def _start(entrypoint: str, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(ROOT / "entrypoints" / entrypoint), *args], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


def test_wrong_main_process_ip_is_one_line_within_the_timeout(demo_project, tmp_path):
    """Machine rank 1 pointed at an address where no machine 0 listens (TEST-NET-1, never routed): the train
    entrypoint stops with one line naming the address and port it tried, within the timeout, before training."""
    port = free_port()
    env = _entrypoint_env(
        tmp_path, demo_project, HVTUNE_OUTPUT_DIR=str(tmp_path / "out"), NUM_PROCESSES="2", NUM_MACHINES="2",
        MACHINE_RANK="1", MAIN_PROCESS_IP="192.0.2.1", MAIN_PROCESS_PORT=str(port),
    )  # fmt: skip
    started = time.monotonic()
    proc = _start("train", env, *STEPS)
    _, stderr = proc.communicate(timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, stderr[-3000:]
    (line,) = _errors(stderr)
    assert f"could not reach machine rank 0 at 192.0.2.1:{port}" in line and f"within {TIMEOUT_S} s" in line, line
    assert "nc -vz" in line and "Traceback" not in stderr
    # the stated timeout, plus the entrypoint's own start (hvtune config get, importing torch) on a loaded 2-core box
    assert elapsed < TIMEOUT_S + 40, elapsed
    assert not (tmp_path / "out").exists()  # nothing written: training never started


def test_runpod_instant_cluster_variables_stand_in_for_accelerates(demo_project, tmp_path):
    """A RunPod instant cluster node sets PRIMARY_ADDR / PRIMARY_PORT / NODE_RANK / NUM_NODES / NUM_TRAINERS and
    WORLD_SIZE (docs.runpod.io/instant-clusters): node 1 tries machine 0 at PRIMARY_ADDR:PRIMARY_PORT with
    NUM_NODES x NUM_TRAINERS processes, and the platform's WORLD_SIZE does not turn a lone process into a group."""
    port = free_port()
    env = _entrypoint_env(
        tmp_path, demo_project, HVTUNE_OUTPUT_DIR=str(tmp_path / "out"), PRIMARY_ADDR="127.0.0.1",
        PRIMARY_PORT=str(port), NODE_RANK="1", NUM_NODES="2", NUM_TRAINERS="1", WORLD_SIZE="2",
    )  # fmt: skip
    for name in ("NUM_PROCESSES", "NUM_MACHINES", "MACHINE_RANK", "MAIN_PROCESS_IP", "MAIN_PROCESS_PORT"):
        env.pop(name, None)
    # the cache service: this node's 1 process builds (here: finds) the whole cache, not waiting for a group of 2
    cache = subprocess.run(
        ["bash", str(ROOT / "entrypoints" / "cache")], env={**env, "HVTUNE_SKIP_FETCH": "1"}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert cache.returncode == 0, cache.stderr[-3000:]
    proc = _start("train", env, *STEPS)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr[-3000:]
    assert "machine 1 of 2" in stderr
    (line,) = _errors(stderr)
    assert f"could not reach machine rank 0 at 127.0.0.1:{port}" in line, line


def test_machine_rank_0_names_the_machines_that_never_came(tmp_path):
    """Machine rank 0 alone: after the timeout, one line saying which ranks never connected and what to set there."""
    port = free_port()
    env = _entrypoint_env(tmp_path, None, NUM_MACHINES="3", MACHINE_RANK="0", MAIN_PROCESS_IP="127.0.0.1")
    r = subprocess.run(
        [sys.executable, "-m", "hvtune", "rendezvous", f"--port={port}"], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    (line,) = _errors(r.stderr)
    assert f"waited {TIMEOUT_S} s on port {port}" in line and "machine rank(s) 1, 2 of NUM_MACHINES=3" in line, line


@pytest.mark.parametrize(
    ("machines", "expect"),
    [
        (
            {"NUM_MACHINES": "2", "MACHINE_RANK": "2", "MAIN_PROCESS_IP": "10.0.0.1"},
            "MACHINE_RANK=2 must be between 0 and 1",
        ),
        ({"NUM_MACHINES": "2", "MACHINE_RANK": "1"}, "NUM_MACHINES=2 needs MAIN_PROCESS_IP"),
        ({"NUM_MACHINES": "2", "MAIN_PROCESS_IP": "10.0.0.1", "MAIN_PROCESS_PORT": "70000"}, "MAIN_PROCESS_PORT=70000"),
        ({"NUM_MACHINES": "2", "MAIN_PROCESS_IP": "10.0.0.1", "HVTUNE_RENDEZVOUS_TIMEOUT": "soon"}, "TIMEOUT=soon"),
    ],
)
def test_a_bad_combination_stops_the_cache_service_at_start(tmp_path, machines, expect):
    """Checked by every entrypoint at its start: the cache service (which runs first, and needs no other machine)
    refuses before it fetches or encodes anything, so the mistake is not found only after a long cache build."""
    env = _entrypoint_env(tmp_path, None, NUM_PROCESSES="2", HVTUNE_SKIP_FETCH="1", **machines)
    r = subprocess.run(
        ["bash", str(ROOT / "entrypoints" / "cache")], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2, r.stderr
    (line,) = _errors(r.stderr)
    assert expect in line, line
    assert list((tmp_path / "data").iterdir()) == []  # nothing written


@pytest.mark.slow
def test_two_machines_on_localhost_meet_and_train_one_run(demo_project, tmp_path):
    """NUM_MACHINES=2 on 127.0.0.1, one process each, each "machine" with its own output folder (as on two boxes):
    they find each other, accelerate launches one 2-process run, machine 0 writes the run and machine 1 nothing.
    Continued without copying machine 0's checkpoints, every process stops before step 1 with one line."""
    port = str(free_port())
    machines = {"NUM_PROCESSES": "2", "NUM_MACHINES": "2", "MAIN_PROCESS_IP": "127.0.0.1", "MAIN_PROCESS_PORT": port}
    procs, results = _both_machines(tmp_path, demo_project, machines, STEPS)
    for p, (_, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    assert "all 2 machines reached 127.0.0.1" in results[0][1]
    assert "machine rank 1 reached machine rank 0" in results[1][1]
    run = json.loads((tmp_path / "machine0" / "out" / "run.json").read_text())
    assert run["world_size"] == 2
    assert (tmp_path / "machine0" / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "machine1" / "out" / "pytorch_lora_weights.safetensors").exists()
    # continued with more steps, machine 0's checkpoints not copied: machine 0 would resume, machine 1 start afresh
    machines["MAIN_PROCESS_PORT"] = str(free_port())
    procs, results = _both_machines(tmp_path, demo_project, machines, ["--max_train_steps=6", *STEPS[1:]])
    for p, (_, stderr) in zip(procs, results, strict=True):
        assert p.returncode != 0
        (line,) = [line for line in _errors(stderr) if "would not continue from the same point" in line]
        assert "process 0: checkpoint-000004" in line and "process 1: a fresh start" in line, line
        assert "copy machine 0's output_dir/checkpoints to every machine" in line
    assert not (tmp_path / "machine1" / "out" / "checkpoints").exists()  # nothing trained on machine 1


def _both_machines(tmp_path: Path, config: Path, machines: dict, steps: list[str]) -> tuple[list, list]:
    """The train entrypoint on two "machines" (each its own folder and output_dir), until both end."""
    procs = []
    for rank in (0, 1):
        home = tmp_path / f"machine{rank}"
        home.mkdir(exist_ok=True)
        env = _entrypoint_env(home, config, HVTUNE_OUTPUT_DIR=str(home / "out"), MACHINE_RANK=str(rank), **machines)
        env["HVTUNE_RENDEZVOUS_TIMEOUT"] = "60"  # machine 1 starts 0-10 s after machine 0 on a loaded box
        procs.append(_start("train", env, *steps))
    return procs, [p.communicate(timeout=300) for p in procs]


def test_compose_machines_file_puts_only_train_on_the_host_network():
    """NCCL between machines opens ports of its own choosing: training needs the host's network, the cache none."""
    from test_container_static import compose_config

    plain = compose_config("cpu")["services"]
    assert "network_mode" not in plain["train"]
    assert plain["train"]["environment"]["NUM_MACHINES"] == "1"
    services = compose_config("cpu", COMPOSE_FILE="compose.yaml:compose.machines.yaml", MACHINE_RANK="1")["services"]
    assert services["train"]["network_mode"] == "host" and "network_mode" not in services["cache"]
    assert services["train"]["environment"]["MACHINE_RANK"] == "1"
