"""The run page benchmark runs end to end at its smallest size, with the page really polled (no timing asserted)."""

from __future__ import annotations

import json

import pytest

from benchmark_run import run_benchmark


@pytest.mark.slow
def test_bench_page_quick(tmp_path):
    out = tmp_path / "page.json"
    run_benchmark("bench_page.py", "--quick", "--out", str(out), timeout=600)
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "page" and doc["ratio"] > 0 and doc["verdict"] in ("met", "MISSED")
    assert {r["mode"] for r in doc["runs"]} == {"plain", "paged"}
    paged = [r for r in doc["runs"] if r["mode"] == "paged"]
    assert all(r["polls"] >= 1 for r in paged), "the page was not polled during the paged run"
