"""Training end to end on the tiny model: outputs, loss, resume, SIGTERM, faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_hvtune
from hvtune.config.settings import load_config
from hvtune.trainer import train

pytestmark = pytest.mark.slow


def resolved(config: Path, out: Path, **overrides):
    argv = [f"--output_dir={out}", *(f"--{k}={v}" for k, v in overrides.items())]
    return load_config(config, env={}, argv=argv)


def test_train_writes_lora_record_videos_and_loss_goes_down(demo_project, tmp_path, tiny_t2v):
    out = tmp_path / "run"
    result = train(resolved(demo_project, out, max_train_steps=30, validation_steps=15, checkpointing_steps=10))
    assert result.global_step == 30 and not result.stopped_early
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    # SimpleTuner's default targets: the dual-stream blocks' and the token refiner's attention
    assert lora and all(
        k.startswith(("transformer.transformer_blocks.", "transformer.context_embedder.")) for k in lora
    )
    assert (out / "comfyui_lora.safetensors").stat().st_size > 0
    videos = sorted(p.relative_to(out).as_posix() for p in (out / "validation").rglob("*.mp4"))
    assert videos == ["validation/step_000015/validation_0.mp4", "validation/step_000030/validation_0.mp4"]
    record = json.loads((out / "run.json").read_text())
    assert record["world_size"] == 1 and record["global_step"] == 30 and record["dataset_manifest_hash"]
    assert record["environment"]["packages"]["torch"].startswith("2.13")
    losses = [json.loads(line)["loss"] for line in (out / "logs/loss.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # it learns
    assert (out / "loss.png").stat().st_size > 0 and list((out / "logs/tensorboard").iterdir())
    # the demo keeps 2; the last step's is kept before its validation
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000020", "checkpoint-000030"]
    # outputs are read from containers by other users: every file and folder gets the umask's mode, none is 0600
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*")}
    wrong = {p: oct(m) for p, m in modes.items() if m not in (0o666 & ~umask, 0o777 & ~umask)}
    assert not wrong, wrong


def test_resume_after_k_steps_gives_the_same_lora_bytes(demo_project, tmp_path):
    full = tmp_path / "full"
    train(resolved(demo_project, full, max_train_steps=8, validation_disable="true"))
    part = tmp_path / "part"
    first = train(resolved(demo_project, part, max_train_steps=8, validation_disable="true"), max_steps_this_run=3)
    assert first.stopped_early and first.global_step == 3 and not (part / "pytorch_lora_weights.safetensors").exists()
    second = train(
        resolved(demo_project, part, max_train_steps=8, validation_disable="true", resume_from_checkpoint="latest")
    )
    assert second.global_step == 8
    a = (full / "pytorch_lora_weights.safetensors").read_bytes()
    assert a == (part / "pytorch_lora_weights.safetensors").read_bytes()
    assert _same_losses(full, part)


def _same_losses(a: Path, b: Path) -> bool:
    def losses(p):
        return [(r["step"], r["loss"]) for r in map(json.loads, (p / "logs/loss.jsonl").read_text().splitlines())]

    return losses(a) == losses(b)


def test_half_written_checkpoint_is_ignored_on_resume(demo_project, tmp_path):
    out = tmp_path / "run"
    train(
        resolved(demo_project, out, max_train_steps=6, validation_disable="true", checkpointing_steps=2),
        max_steps_this_run=4,
    )
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-000002", "checkpoint-000004"]
    # a save killed mid-way: a hidden temp dir, and a checkpoint dir without its completion marker
    (ckpts / ".checkpoint-000006.abc").mkdir()
    (ckpts / "checkpoint-000005").mkdir()
    result = train(
        resolved(demo_project, out, max_train_steps=6, validation_disable="true", resume_from_checkpoint="latest")
    )
    assert result.global_step == 6
    steps = [json.loads(line)["step"] for line in (out / "logs/loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("signals", [["SIGTERM"], ["SIGINT"], ["SIGINT", "SIGINT"]])
def test_sigterm_or_ctrl_c_writes_a_checkpoint_and_exits_cleanly_a_second_ctrl_c_stops_at_once(
    demo_project, tmp_path, signals
):
    out = tmp_path / "run"
    app = str(Path(__file__).resolve().parents[1] / "app")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hvtune",
            "train",
            "--config",
            str(demo_project),
            f"--output_dir={out}",
            "--max_train_steps=100000",
            "--validation_disable=true",
            "--checkpointing_steps=100000",
            # two Ctrl-C: steps of 40 micro-batches, so that the second lands inside the step the first one ends
            f"--gradient_accumulation_steps={40 if len(signals) == 2 else 1}",
        ],
        env={**os.environ, "PYTHONPATH": app},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log = out / "logs/loss.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    for name in signals:  # apart: the kernel merges two pending SIGINTs into one
        proc.send_signal(getattr(signal, name))
        time.sleep(0.3)
    output, _ = proc.communicate(timeout=120)
    ckpts = list((out / "checkpoints").glob("checkpoint-*"))
    if len(signals) == 2:  # issue 13.10: the second Ctrl-C does not wait for the step
        assert proc.returncode == 130 and not ckpts and "stopped at once" in output, output
        return
    assert proc.returncode == 0, output
    assert (
        len(ckpts) == 1 and f"{signals[0]}: checkpoint written" in output and "resume_from_checkpoint=latest" in output
    )
    if signals == ["SIGINT"]:
        assert "Ctrl-C: stopping after this step with a checkpoint" in output
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert state["global_step"] >= 3


def test_missing_cache_exits_2_naming_it(demo_project, tmp_path):
    cfg = json.loads(demo_project.read_text())
    cfg["cache_dir"] = str(tmp_path / "empty-cache")
    cfg["output_dir"] = str(tmp_path / "out")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg))
    r = run_hvtune("train", "--config", str(config))
    assert r.returncode == 2 and "hvtune cache" in r.stderr and "empty-cache" in r.stderr
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def test_unwritable_output_dir_fails_before_work(demo_project, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    r = run_hvtune("train", "--config", str(demo_project), f"--output_dir={blocker}/out")
    # issue 13.8: the message says what is wrong (a file in the way), not "permission denied"
    assert r.returncode == 2 and f"{blocker} is a file, not a folder" in r.stderr, r.stderr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(demo_project, tmp_path):
    out = tmp_path / "run"
    train(
        resolved(demo_project, out, max_train_steps=10, validation_disable="true", checkpointing_steps=2),
        max_steps_this_run=2,
    )
    good = out / "checkpoints" / "checkpoint-000002"
    before = (good / "lora.safetensors").read_bytes()
    r = run_hvtune(
        "train",
        "--config",
        str(demo_project),
        f"--output_dir={out}",
        "--max_train_steps=10",
        "--validation_disable=true",
        "--checkpointing_steps=2",
        "--learning_rate=1e12",
        "--max_grad_norm=0",
        "--resume_from_checkpoint=latest",
    )
    assert r.returncode == 1 and "loss became" in r.stderr and "last good checkpoint" in r.stderr, r.stderr[-2000:]
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert ckpts[0] == "checkpoint-000002" and (good / "lora.safetensors").read_bytes() == before
    for ckpt in ckpts:  # whatever was saved before the blow-up holds finite weights
        assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoints" / ckpt / "lora.safetensors").values())
    assert not (out / "pytorch_lora_weights.safetensors").exists()


def test_i2v_trains_on_real_image_conditions_and_validates(demo_project_i2v, tmp_path):
    from hvtune.cache.manifest import load_manifest
    from hvtune.train.batches import load_batch, plan_epoch

    config = resolved(demo_project_i2v, tmp_path / "run", max_train_steps=2, validation_num_inference_steps=2)
    manifest = load_manifest(config)
    batch = load_batch(manifest, plan_epoch(manifest, global_batch_size=2, seed=0, epoch=0)[0])
    assert batch.image_embeds is not None and batch.image_embeds.abs().sum() > 0  # real SigLIP, not zeros
    assert batch.cond_mask[:, :, 0].eq(1).all() and batch.cond_mask[:, :, 1:].eq(0).all()
    assert batch.cond_latents[:, :, 1:].eq(0).all() and batch.cond_latents[:, :, 0].abs().sum() > 0
    result = train(config)
    assert result.global_step == 2
    assert list((tmp_path / "run" / "validation").rglob("*.mp4"))
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["resolved"]["config"]["model_flavour"] == "i2v-480p"


def test_cuda_only_features_refused_on_cpu(demo_project, tmp_path):
    r = run_hvtune(
        "train",
        "--config",
        str(demo_project),
        f"--output_dir={tmp_path / 'o'}",
        "--enable_group_offload=true",
        "--group_offload_use_stream=true",
    )
    assert r.returncode == 2 and "group_offload_use_stream" in r.stderr and "CUDA" in r.stderr


def test_targets_without_a_comfyui_name_fail_before_training(demo_project, tmp_path):
    out = tmp_path / "o"
    r = run_hvtune(
        "train", "--config", str(demo_project), f"--output_dir={out}", '--lora_target_modules=["x_embedder.proj"]'
    )
    assert r.returncode == 2 and "no ComfyUI name" in r.stderr and "x_embedder.proj" in r.stderr
    assert not (out / "logs" / "loss.jsonl").exists()
