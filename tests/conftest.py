"""Shared fixtures: the tiny models are built once per test session (they take a few seconds each)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "app"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEED_GUIDE = Path(__file__).resolve().parents[1] / "examples" / "seed-project"


@pytest.fixture(scope="session")
def tiny_t2v(tmp_path_factory) -> Path:
    from hvtune.testing.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-t2v", task="t2v", seed=0)


@pytest.fixture(scope="session")
def tiny_i2v(tmp_path_factory) -> Path:
    from hvtune.testing.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-i2v", task="i2v", seed=0)


@pytest.fixture(scope="session")
def demo_project(tmp_path_factory):
    """The demo project (tiny t2v model, 8 synthetic clips) with its cache built once; tests train from it."""
    from hvtune.cache.build import build_cache
    from hvtune.config.settings import load_config
    from hvtune.testing.demo import write_demo_project

    config = write_demo_project(tmp_path_factory.mktemp("demo"), task="t2v", steps=12)
    build_cache(load_config(config, env={}), progress=False)
    return config


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a launcher's rendezvous, a test's second process group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_hvtune(*args: str, env: dict | None = None, cwd=None, timeout: int = 600):
    """`python -m hvtune ...` in a subprocess, as a user would run it."""
    import subprocess

    app = str(Path(__file__).resolve().parents[1] / "app")
    full_env = {**os.environ, "PYTHONPATH": app, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "hvtune", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout
    )


@pytest.fixture(scope="session")
def demo_project_i2v(tmp_path_factory):
    from hvtune.cache.build import build_cache
    from hvtune.config.settings import load_config
    from hvtune.testing.demo import write_demo_project

    config = write_demo_project(tmp_path_factory.mktemp("demo-i2v"), task="i2v", clips=4, steps=4)
    build_cache(load_config(config, env={}), progress=False)
    return config


def simpletuner_wheel_file() -> Path:
    """SimpleTuner 4.10.1's wheel, downloaded once from PyPI into ~/.cache/hvtune-tests; the test skips without PyPI."""
    import subprocess

    cache = Path.home() / ".cache" / "hvtune-tests"
    wheel = cache / "simpletuner-4.10.1-py3-none-any.whl"
    if not wheel.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "simpletuner==4.10.1", "--python-version",
               "3.12", "--only-binary=:all:", "-d", str(cache), "-q"]  # fmt: skip
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            pytest.skip("PyPI not reachable: cannot download simpletuner 4.10.1")
    return wheel
