"""The GPU benchmark and the sequence-length benchmark run end to end at their smallest size (no timing asserted)."""

from __future__ import annotations

import json

import pytest

from benchmark_run import run_benchmark


@pytest.mark.slow
def test_bench_gpu_cpu_smoke(tmp_path):
    out = tmp_path / "gpu-cpu-smoke.json"
    proc = run_benchmark("bench_gpu.py", "--cpu-smoke", "--out", str(out), timeout=300)
    doc = json.loads(out.read_text())
    assert doc["device"]["device"] == "cpu"
    assert doc["model"]["config"]["num_layers"] == 2
    assert "3 x forward" in doc["flops_formula"]
    by_config = {r["config"]: r for r in doc["results"]}
    assert {"plain", "gc", "gc+offload", "gc+int8", "gc:trimmed", "gc:maskfree"} <= set(by_config)
    for name, r in by_config.items():
        assert r["status"] == "ok", (name, r.get("error"), r.get("traceback"))
        for key in (
            "s_per_step",
            "tokens_per_s",
            "seq_len",
            "train_tflop_per_step",
            "host_peak_rss_gib",
            "step_times_s",
            "trainable_params",
            "sdpa_in_model",
            "mfu",
        ):
            assert key in r, (name, key)
        assert r["trainable_params"] > 0
        assert all(v == v for v in r["losses"]), name  # finite (not NaN)
    # hvtune's layout without padding hands SDPA no mask; the pipeline's padded layout a dense one
    assert by_config["gc:maskfree"]["sdpa_in_model"]["block_attn_mask"] == ["None"]
    assert all(m.startswith("dense") for m in by_config["gc"]["sdpa_in_model"]["block_attn_mask"])
    # same weights, same sample: checkpointing, offload and every text layout (padded, trimmed, mask-free) give the
    # same loss through the trainer's training_loss; int8 changes the weights, so it is left out
    first = {name: r["losses"][0] for name, r in by_config.items() if "int8" not in name}
    assert max(first.values()) - min(first.values()) < 1e-4, first
    assert by_config["gc:trimmed"]["seq_len"] < by_config["gc"]["seq_len"]
    assert by_config["gc:maskfree"]["seq_len"] < by_config["gc:trimmed"]["seq_len"]
    (sdpa,) = doc["sdpa"]
    assert sdpa["status"] == "ok"
    assert {c["case"].split(",")[0] for c in sdpa["cases"]} >= {"minimal (maskfree)", "pipeline (padded)"}
    assert all("default" in c for c in sdpa["cases"])
    assert "s/step" in proc.stdout and "MFU" in proc.stdout


@pytest.mark.slow
def test_bench_seqlen_smoke(tmp_path):
    out = tmp_path / "seqlen.json"
    proc = run_benchmark("bench_seqlen.py", "--smoke", "--out", str(out), timeout=300)
    doc = json.loads(out.read_text())
    assert doc["pipeline_padding"] == {**doc["pipeline_padding"], "qwen": 1000, "byt5": 256, "image": 729}
    assert doc["resolutions"]["480p"]["latents"] == [32, 16, 30, 53]
    assert doc["resolutions"]["720p"]["latents"] == [32, 31, 45, 80]
    rows = doc["savings"]
    assert {(r["resolution"], r["task"]) for r in rows} == {(r, t) for r in ("480p", "720p") for t in ("t2v", "i2v")}
    for r in rows:
        assert r["tokens"]["pipeline"]["total"] == r["tokens"]["pipeline"]["video"] + 1000 + 256 + 729
        for layout in ("trimmed", "minimal"):
            assert r[layout]["tokens_saved_per_step"] > 0
            assert 0 < r[layout]["attention_cost_ratio"] < 1
    p480 = next(r for r in rows if r["resolution"] == "480p")
    assert p480["tokens"]["pipeline"]["video"] == 25440
    demo = doc["attention_path_demo"]
    cases = {c["case"].split(":")[0]: c for c in demo["cases"]}
    assert cases["minimal, KeyPaddingAttnProcessor (hvtune)"]["block_attn_mask"] == ["None"]
    assert cases["pipeline"]["block_mask_all_true"] == ["False"]
    assert all(v < 1e-4 for v in demo["max_abs_diff"].values()), demo["max_abs_diff"]
    assert "S pipeline" in proc.stdout
