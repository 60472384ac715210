"""The GPU benchmark and the sequence-length benchmark run end to end at their smallest size (no timing asserted)."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from benchmark_run import ROOT, run_benchmark


def _bench_gpu():
    """benchmarks/bench_gpu.py as a module (it imports its neighbour `common`, as when run as a script)."""
    import sys

    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_session_fastpath_mode_runs_configurations_the_benchmark_knows_within_the_ten_minutes():
    """session.sh fastpath: eager, compiled, torch's attention kernels and fp8 on the same 480p step."""
    bench = _bench_gpu()
    text = (ROOT / "benchmarks/gpu/session.sh").read_text()
    block = text[text.index("fastpath)") : text.index(";;", text.index("fastpath)"))]
    configs = re.search(r'--configs "([^"]+)"', block).group(1).split(",")
    assert [bench.parse_config(c)[1] for c in configs] == ["maskfree"] * len(configs)  # no padding: one layout
    memories = {bench.parse_config(c)[0] for c in configs}
    assert {"gc", "gc+compile", "gc+cudnn", "gc+fp8", "gc+compile+fp8"} <= memories
    deadline, per_config = (float(re.search(rf"--{k} (\d+)", block).group(1)) for k in ("deadline", "timeout"))
    assert deadline + per_config <= 560 and "--res 480p" in block  # leaves time to install and copy under 600 s


@pytest.mark.slow
def test_bench_gpu_fast_path_cpu_smoke(tmp_path):
    """The fast-path configurations through the benchmark's own code on the tiny model: compiled and the CPU's math
    kernel give eager's losses (fp32), fp8 stays within 5e-3 (tests/test_fast_path.py states why); each row has
    s/step, MFU, peak and the warm-up (compile) times."""
    bench = _bench_gpu()
    out = tmp_path / "fastpath.json"
    configs = ",".join(bench.FASTPATH_SMOKE_CONFIGS)
    args = ("--cpu-smoke", "--configs", configs, "--no-sdpa", "--jobs", "1", "--timeout", "1200", "--out", str(out))
    run_benchmark("bench_gpu.py", *args, timeout=2400)
    by_config = {r["config"]: r for r in json.loads(out.read_text())["results"]}
    assert set(by_config) == set(bench.FASTPATH_SMOKE_CONFIGS)
    for name, r in by_config.items():
        assert r["status"] == "ok", (name, r.get("error"), r.get("traceback"))
        assert {"s_per_step", "mfu", "warmup_times_s", "step_times_s"} <= set(r), name
    eager = by_config["gc:maskfree"]["losses"]
    for name, rtol in (("gc+compile:maskfree", 1e-5), ("gc+native-math:maskfree", 1e-5), ("gc+fp8:maskfree", 5e-3)):
        got = by_config[name]["losses"]
        assert all(abs(a - b) <= rtol * abs(b) + 1e-5 for a, b in zip(got, eager, strict=True)), (name, got, eager)


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
