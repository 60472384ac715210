"""The training benchmark runs end to end at its smallest size and writes every field (no timing asserted)."""

from __future__ import annotations

import json

import pytest

from benchmark_run import run_benchmark


@pytest.mark.slow
def test_bench_train_quick(tmp_path):
    out = tmp_path / "train.json"
    proc = run_benchmark("bench_train.py", "--quick", "--out", str(out), timeout=600)
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "train" and doc["quick"] is True
    assert set(doc["budgets"]) == {"step_ratio", "start_to_first_step_s", "peak_rss_gb", "cached_rerun_200_clips_s"}
    for entry in doc["budgets"].values():
        assert {"value", "budget", "verdict"} <= set(entry)
    ratio = doc["step_ratio"]
    for key in ("trainer_median_step_s", "bare_median_step_s", "ratio", "runs", "same_batches_max_loss_diff"):
        assert key in ratio
    assert ratio["ratio"] > 0
    assert {r["loop"] for r in ratio["runs"]} == {"trainer", "bare"}
    # the bare loop ran the same batches as the trainer: same first losses
    assert ratio["same_batches_max_loss_diff"] < 1e-4
    startup = doc["startup"]
    for key in ("start_to_first_step_s", "before_loop_s", "first_step_own_s", "peak_rss_gb", "peak_rss_method"):
        assert key in startup
    assert startup["peak_rss_gb"] > 0
    assert startup["import_floor"]["median_s"] > 0 and "the rest of the start-up" in proc.stdout
    cache = doc["cache_rerun"]
    for key in ("clips", "first_build_completed", "rerun_median_s", "rerun_process_wall_s", "rerun_s_for_200"):
        assert key in cache
    assert cache["rerun_median_s"] > 0
    assert "\n" in proc.stdout and "verdict" in proc.stdout
