"""The run record's parts on real files: the loss log a resumed run continues, the fingerprints and environment that
let a run be repeated and compared, the determinism knobs, the loss plot. Fast: no training."""

from __future__ import annotations

import json
import os
import platform
import sys

import pytest
import torch

from hvtune.output.record import (
    DETERMINISM_ENV,
    LossLog,
    apply_determinism,
    environment,
    plot_losses,
    read_loss_log,
    sha256_json,
)


def test_the_loss_log_is_readable_after_every_step(tmp_path):
    path = tmp_path / "logs" / "loss.jsonl"
    log = LossLog(path)
    log.write(step=1, loss=0.9, lr=1e-3, seconds=0.2)
    assert read_loss_log(path) == [{"step": 1, "loss": 0.9, "lr": 1e-3, "seconds": 0.2}]  # flushed, not at close
    log.write(step=2, loss=0.8, lr=1e-3, seconds=0.2)
    log.close()
    assert [r["step"] for r in read_loss_log(path)] == [1, 2]


def test_a_resumed_run_keeps_the_steps_before_its_checkpoint_and_redoes_the_rest(tmp_path):
    path = tmp_path / "loss.jsonl"
    log = LossLog(path)
    for step in range(1, 6):
        log.write(step=step, loss=1.0 / step)
    log.close()
    resumed = LossLog(path, resume_from_step=3)  # the checkpoint was at step 3; steps 4-5 are trained again
    resumed.write(step=4, loss=0.2)
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_loss_log(path)] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.2)]


def test_blank_lines_in_the_loss_log_are_skipped(tmp_path):
    path = tmp_path / "loss.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n\n   \n{"step": 2, "loss": 0.4}\n')
    assert [r["step"] for r in read_loss_log(path)] == [1, 2]


def test_a_line_torn_by_a_kill_does_not_block_the_resume_and_is_reported(tmp_path):
    path = tmp_path / "loss.jsonl"
    log = LossLog(path)
    for step in range(1, 6):
        log.write(step=step, loss=1.0 / step)
    log.close()
    with path.open("a") as f:  # killed while writing step 6: half a line, no newline
        f.write('{"step": 6, "loss": 0.1')
    said: list[str] = []
    resumed = LossLog(path, resume_from_step=5, say=said.append)
    resumed.write(step=6, loss=0.15)
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_loss_log(path)] == [(s, 1.0 / s) for s in range(1, 6)] + [(6, 0.15)]
    assert len(said) == 1 and "line 6" in said[0] and str(path) in said[0]


def test_a_damaged_line_is_skipped_with_a_notice_naming_it(tmp_path):
    path = tmp_path / "loss.jsonl"
    # a full disk can leave a block of NUL bytes; an editor or a foreign tool a row without a loss
    path.write_bytes(b'{"step": 1, "loss": 0.5}\n\x00\x00\x00\n{"step": 2}\n{"step": 3, "loss": 0.4}\n')
    said: list[str] = []
    assert [r["step"] for r in read_loss_log(path, say=said.append)] == [1, 3]
    assert said == [f"{path}: skipped 2 damaged line(s) (line 2, 3): cut short by a kill or a full disk"]


def test_the_config_fingerprint_ignores_key_order_and_sees_every_value():
    config = {"lora_rank": 16, "seed": 42, "nested": {"a": 1, "b": [1, 2]}}
    reordered = {"nested": {"b": [1, 2], "a": 1}, "seed": 42, "lora_rank": 16}
    assert sha256_json(config) == sha256_json(reordered)
    assert sha256_json(config) != sha256_json({**config, "seed": 43})
    assert len(sha256_json(config)) == 64


def test_the_environment_names_what_a_repeat_needs(monkeypatch):
    monkeypatch.setenv("HVTUNE_IMAGE", "hvtune:cuda-test")
    monkeypatch.delenv("HVTUNE_IMAGE_VARIANT", raising=False)
    env = environment()
    assert env["python"] == sys.version.split()[0]
    assert env["platform"] == platform.platform()
    assert env["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert {"diffusers", "peft", "accelerate", "safetensors", "hvtune"} <= set(env["packages"])
    assert env["image"] == {"HVTUNE_IMAGE": "hvtune:cuda-test"}
    assert env["torch_cuda"] == torch.version.cuda
    if not torch.cuda.is_available():
        assert env["gpu"] is None
    json.dumps(env)  # it goes into run.json as it is


@pytest.fixture
def restore_torch_determinism():
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[4], saved[5]


def test_determinism_sets_the_knobs_and_records_them(monkeypatch, restore_torch_determinism):
    for key in DETERMINISM_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's own setting wins
    knobs = apply_determinism(True)
    assert knobs["deterministic"] is True
    assert knobs["env"]["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert knobs["env"]["PYTORCH_TUNABLEOP_ENABLED"] == os.environ["PYTORCH_TUNABLEOP_ENABLED"] == "0"
    expected = {"use_deterministic_algorithms": True, "cudnn.benchmark": False, "matmul.allow_tf32": False}
    assert knobs["torch"] == expected


def test_without_determinism_nothing_is_set_but_the_state_is_recorded(monkeypatch, restore_torch_determinism):
    for key in DETERMINISM_ENV:
        monkeypatch.delenv(key, raising=False)
    knobs = apply_determinism(False)
    assert knobs["deterministic"] is False
    assert knobs["env"] == dict.fromkeys(DETERMINISM_ENV)
    assert not any(key in os.environ for key in DETERMINISM_ENV)


def test_the_loss_plot_is_a_png_written_whole(tmp_path):
    path = tmp_path / "plots" / "loss.png"
    plot_losses(path, {"A": [(1, 0.9), (2, 0.7)], "B": [(1, 0.95), (2, 0.72)], "empty": []}, "loss")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["loss.png"]  # no temp left beside it
