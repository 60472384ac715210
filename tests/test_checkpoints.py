"""Checkpoints on real files: retention keeps the newest N complete ones, a half-written one is never resumed, a
checkpoint gives back what was saved, and a `train` in a used output_dir continues, finishes or refuses as it should.
Fast: no model, a few small tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hvtune.output.checkpoints import (
    STATE_FILE,
    CheckpointError,
    LoopState,
    clear_run_outputs,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    plan_start,
    run_identity,
    save_checkpoint,
)

CONFIG = {
    "model_flavour": "t2v-480p",
    "lora_type": "standard",
    "lora_rank": 8,
    "lora_alpha": None,
    "lora_target_modules": None,
    "optimizer": "adamw",
    "seed": 42,
    "use_ema": False,
    "train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "lora_dropout": 0.0,
    "pretrained_model_name_or_path": "/models/hv",
}
IDENTITY = run_identity(CONFIG, "data-hash")


def _save(out: Path, step: int, keep: int | None = None, identity: dict | None = None) -> Path:
    state = LoopState(global_step=step, epoch=0, batch_in_epoch=step, loss_history=[0.5] * step, run=identity)
    lora = {"block.lora_A.weight": torch.full((2, 3), float(step))}
    return save_checkpoint(out, state, lora, {"state": {}, "param_groups": []}, {"last_epoch": step}, keep)


def _steps(out: Path) -> list[int]:
    return [json.loads((c / STATE_FILE).read_text())["global_step"] for c in list_checkpoints(out)]


def test_retention_keeps_the_newest_checkpoints(tmp_path):
    for step in (5, 10, 15, 20):
        _save(tmp_path, step, keep=2)
    assert _steps(tmp_path) == [15, 20]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-000015", "checkpoint-000020"]


def test_steps_sort_as_numbers_and_no_limit_keeps_all(tmp_path):
    for step in (100, 9, 1000, 99):
        _save(tmp_path, step, keep=None)
    assert _steps(tmp_path) == [9, 99, 100, 1000]


def test_a_half_written_checkpoint_is_never_resumed_and_the_next_save_removes_the_debris(tmp_path):
    _save(tmp_path, 10)
    root = tmp_path / "checkpoints"
    killed_mid_write = root / ".checkpoint-000020.tmp-123"  # a save killed before its rename
    killed_mid_write.mkdir()
    (killed_mid_write / "lora.safetensors").write_bytes(b"half")
    no_state = root / "checkpoint-000030"  # a folder without its state file (written last) is not complete
    no_state.mkdir()
    (no_state / "lora.safetensors").write_bytes(b"half")

    assert _steps(tmp_path) == [10]
    assert find_checkpoint(tmp_path, "latest") == root / "checkpoint-000010"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        find_checkpoint(tmp_path, str(no_state))

    _save(tmp_path, 40, keep=1)
    assert not killed_mid_write.exists()
    assert _steps(tmp_path) == [40]


def test_a_checkpoint_gives_back_what_was_saved(tmp_path):
    path = _save(tmp_path, 7, identity=IDENTITY)
    state, lora, optimizer, scheduler = load_checkpoint(path)
    assert state == LoopState(global_step=7, epoch=0, batch_in_epoch=7, loss_history=[0.5] * 7, run=IDENTITY)
    assert torch.equal(lora["block.lora_A.weight"], torch.full((2, 3), 7.0))
    assert optimizer == {"state": {}, "param_groups": []} and scheduler == {"last_epoch": 7}
    assert path.stat().st_mode & 0o044, "the checkpoint's files are readable by other users (not 0600)"
    assert (path / "lora.safetensors").stat().st_mode & 0o044


def test_resume_by_simpletuner_name_or_latest(tmp_path):
    assert find_checkpoint(tmp_path, "latest") is None  # nothing yet: a fresh start
    assert find_checkpoint(tmp_path, None) is None
    _save(tmp_path, 3)
    _save(tmp_path, 6)
    assert find_checkpoint(tmp_path, "checkpoint-000003") == tmp_path / "checkpoints" / "checkpoint-000003"
    assert find_checkpoint(tmp_path, "latest").name == "checkpoint-000006"


# ------------------------------------------------------------------------------------------------ a used output_dir


def test_an_empty_folder_starts_fresh(tmp_path):
    start = plan_start(tmp_path, None, IDENTITY, 100, overwrite=False)
    assert (start.resume, start.finished_at, start.notices, start.clear) == (None, None, [], [])


def test_checkpoints_of_another_run_are_not_continued_unasked(tmp_path):
    _save(tmp_path, 10, identity=IDENTITY)
    with pytest.raises(CheckpointError, match="resume_from_checkpoint=latest") as err:
        plan_start(tmp_path, None, IDENTITY, 100, overwrite=False)
    assert "checkpoints up to step 10" in str(err.value) and "overwrite_output_dir=true" in str(err.value)


def test_latest_continues_a_compatible_run_and_announces_what_changed(tmp_path):
    _save(tmp_path, 10, identity=IDENTITY)
    _save(tmp_path, 20, identity=IDENTITY)
    start = plan_start(tmp_path, "latest", IDENTITY, 100, overwrite=False)
    assert start.resume == tmp_path / "checkpoints" / "checkpoint-000020" and start.notices == []

    reseeded = run_identity({**CONFIG, "seed": 7}, "data-hash")
    start = plan_start(tmp_path, "latest", reseeded, 100, overwrite=False)
    assert start.notices == ["changed at resume: seed 42 -> 7"]


def test_a_checkpoint_with_another_lora_shape_or_past_the_end_is_refused(tmp_path):
    _save(tmp_path, 20, identity=IDENTITY)
    with pytest.raises(CheckpointError, match=r"cannot resume .*lora_rank 8 -> 16"):
        plan_start(tmp_path, "latest", run_identity({**CONFIG, "lora_rank": 16}, "data-hash"), 100, overwrite=False)
    with pytest.raises(CheckpointError, match="past max_train_steps=15"):
        plan_start(tmp_path, "latest", IDENTITY, 15, overwrite=False)


def test_a_finished_run_is_reported_finished_and_overwrite_clears_only_hvtunes_outputs(tmp_path):
    _save(tmp_path, 30, identity=IDENTITY)
    record = {"global_step": 30, "stopped_early": False, "run": IDENTITY}
    (tmp_path / "run.json").write_text(json.dumps(record))
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
    (tmp_path / "my_notes.txt").write_text("mine")

    assert plan_start(tmp_path, None, IDENTITY, 30, overwrite=False).finished_at == 30
    with pytest.raises(CheckpointError, match="holds another run, finished at step 30"):
        plan_start(tmp_path, None, run_identity({**CONFIG, "lora_rank": 4}, "data-hash"), 30, overwrite=False)

    start = plan_start(tmp_path, None, IDENTITY, 30, overwrite=True)
    assert {p.name for p in start.clear} == {"checkpoints", "run.json", "pytorch_lora_weights.safetensors"}
    clear_run_outputs(start.clear)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_notes.txt"]
