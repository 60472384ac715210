"""The run page benchmark runs end to end at its smallest size, with the page really polled (no timing asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_page_quick(tmp_path):
    out = tmp_path / "page.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "app"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_page.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"bench_page.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "page" and doc["ratio"] > 0 and doc["verdict"] in ("met", "MISSED")
    assert {r["mode"] for r in doc["runs"]} == {"plain", "paged"}
    paged = [r for r in doc["runs"] if r["mode"] == "paged"]
    assert all(r["polls"] >= 1 for r in paged), "the page was not polled during the paged run"
