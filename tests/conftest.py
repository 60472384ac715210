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
    from hvtune.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-t2v", task="t2v", seed=0)


@pytest.fixture(scope="session")
def tiny_i2v(tmp_path_factory) -> Path:
    from hvtune.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-i2v", task="i2v", seed=0)
