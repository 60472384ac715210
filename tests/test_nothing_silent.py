"""Issue 13: failures that used to pass without a word (mixed runs, lying caches, ignored clips, cut captions) and
errors a user can act on. Each test reproduces the case on real clips and the tiny model."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from clips import write_clip
from conftest import run_hvtune
from hvtune.cache.build import build_cache
from hvtune.cache.manifest import load_manifest
from hvtune.cache.store import CacheError, entry_damage
from hvtune.cache.verify import print_verify
from hvtune.config.settings import load_config
from hvtune.data.datasets import scan
from hvtune.output.checkpoints import CheckpointError
from hvtune.trainer import TrainError, train


def _project(tmp_path: Path, root: Path, **train) -> object:
    backend = [
        {
            "id": "clips",
            "dataset_type": "video",
            "instance_data_dir": str(root),
            "resolution": 48,
            "resolution_type": "pixel",
            "caption_strategy": "textfile",
            "video": {"num_frames": 9},
        },
        {"id": "text", "dataset_type": "text_embeds", "default": True},
    ]
    (tmp_path / "mdb.json").write_text(json.dumps(backend))
    config = {
        "cache_dir": str(tmp_path / "cache"),
        "data_backend_config": str(tmp_path / "mdb.json"),
        "aspect_bucket_alignment": 16,  # tiny clips: SimpleTuner's 64 would leave one bucket
        **train,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    return load_config(tmp_path / "config.json", env={})


def _clip(path: Path, text: str = "a grey square") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_clip(path, frames=9)
    path.with_suffix(".txt").write_text(text)
    return path


# case 4
def test_clips_behind_a_folder_link_are_scanned_and_a_link_loop_is_reported_once(tmp_path):
    elsewhere = tmp_path / "other-disk" / "batch2"
    for i in range(3):
        _clip(elsewhere / f"b{i}.mp4")
    root = tmp_path / "clips"
    _clip(root / "a.mp4")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "back").symlink_to(root, target_is_directory=True)  # a loop through the link
    (root / "again").symlink_to(elsewhere, target_is_directory=True)  # the same folder a second time
    (root / "unplugged").symlink_to(tmp_path / "usb-disk", target_is_directory=True)  # a link to nothing
    result = scan(_project(tmp_path, root), progress=False)
    assert sorted(s.rel for s in result.samples) == ["a.mp4", "again/b0.mp4", "again/b1.mp4", "again/b2.mp4"]
    skipped = {Path(i.source).relative_to(root).as_posix(): i.reason for i in result.skipped}
    assert skipped == {"again/back": "folder_seen_twice", "linked": "folder_seen_twice", "unplugged": "broken_link"}
    assert result.found == {"clips": 7}  # 4 clips + 3 links reported


# case 11
def test_a_clip_of_random_bytes_is_reported_as_corrupt_not_with_the_decoders_errno_text(tmp_path):
    root = tmp_path / "clips"
    _clip(root / "good.mp4")
    for seed in range(6):
        (root / f"random{seed}.mp4").write_bytes(random.Random(seed).randbytes(20000))
        (root / f"random{seed}.txt").write_text("noise")
    result = scan(_project(tmp_path, root), progress=False)
    assert len(result.skipped) == 6 and {i.reason for i in result.skipped} == {"corrupt"}
    for issue in result.skipped:
        assert "not permitted" not in issue.detail and "undecodable" in issue.detail, issue.detail


# ----------------------------------------------------------------------------------------- a cache of our own to damage


@pytest.fixture(scope="module")
def own_cache(tmp_path_factory):
    """A demo project (tiny t2v model, 4 clips) with its cache built: these tests damage and repair it."""
    from hvtune.testing.demo import write_demo_project

    config = write_demo_project(tmp_path_factory.mktemp("own"), task="t2v", clips=4, steps=4)
    build_cache(load_config(config, env={}), progress=False)
    return config


def _resolved(config: Path, **overrides):
    return load_config(config, env={}, argv=[f"--{k}={v}" for k, v in overrides.items()])


# case 2
@pytest.mark.slow
def test_a_truncated_cache_entry_is_no_hit_and_training_names_it_with_the_repair_command(own_cache, tmp_path, capsys):
    resolved = _resolved(own_cache, output_dir=tmp_path / "run", validation_disable="true")
    manifest = load_manifest(resolved)
    damaged = manifest.latent_path(manifest.samples[1])
    damaged.write_bytes(damaged.read_bytes()[:-100])  # a copy cut short, a full disk

    with pytest.raises(CacheError, match="damaged") as refused:  # before any model is loaded
        train(resolved)
    assert str(damaged) in str(refused.value) and f"hvtune cache --config {own_cache}" in str(refused.value)
    capsys.readouterr()
    assert print_verify(resolved) == 1
    verify_out = capsys.readouterr().out
    assert str(damaged) in verify_out and f"to repair: run `hvtune cache --config {own_cache}`" in verify_out

    summary = build_cache(resolved, progress=False)
    assert summary.misses["latent"] == 1 and summary.hits["latent"] == len(manifest.samples) - 1
    assert entry_damage(damaged) is None and print_verify(resolved) == 0


# case 3
def test_a_caption_edited_after_caching_stops_training_until_the_cache_is_rebuilt(own_cache, tmp_path):
    resolved = _resolved(own_cache, output_dir=tmp_path / "run")
    manifest = load_manifest(resolved)
    caption = next(Path(own_cache).parent.parent.rglob("*.txt"))
    original = caption.read_text()
    caption.write_text(original + " at dusk")
    try:
        with pytest.raises(CacheError, match="edited or replaced since the cache was built") as refused:
            load_manifest(resolved)
        assert str(caption) in str(refused.value) and "hvtune cache" in str(refused.value)
        build_cache(resolved, progress=False)
        rebuilt = load_manifest(resolved)
        assert any("at dusk" in s.caption for s in rebuilt.samples)
        assert rebuilt.samples_hash != manifest.samples_hash
    finally:
        caption.write_text(original)
        build_cache(resolved, progress=False)


# case 5
def test_a_caption_cut_to_the_encoders_limit_gets_a_report_line_naming_its_clip(own_cache, tmp_path):
    resolved = _resolved(own_cache)
    caption = sorted(Path(own_cache).parent.parent.rglob("*.txt"))[0]
    original = caption.read_text()
    caption.write_text("a red circle moving right " * 800)  # 20,800 characters (20,799 once stripped)
    try:
        summary = build_cache(resolved, progress=False)
        assert summary.converted.get("caption_truncated") == 1
        lines = [json.loads(line) for line in summary.report_path.read_text().splitlines()]
        cut = [line for line in lines if line["reason"] == "caption_truncated"]
        assert len(cut) == 1 and Path(cut[0]["source"]).stem == caption.stem
        assert "20799 characters cut to the text encoder's limit of 1000 tokens" in cut[0]["detail"]
    finally:
        caption.write_text(original)
        build_cache(resolved, progress=False)


# ------------------------------------------------------------------------------------------- a run owns its output_dir

LORA = "pytorch_lora_weights.safetensors"


def _train_args(out: Path, **overrides) -> dict:
    return {"output_dir": out, "validation_disable": "true", "checkpointing_steps": 4, **overrides}


# case 1 and issue 11's restarted container
@pytest.mark.slow
def test_a_new_run_into_a_used_output_dir_is_refused_and_a_finished_run_is_not_retrained(demo_project, tmp_path):
    out = tmp_path / "run"
    train(_resolved(demo_project, **_train_args(out, max_train_steps=12)))
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    checkpoints = ["checkpoint-000008", "checkpoint-000012"]  # the last step's too (the demo keeps 2)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoints

    # a fresh run into the folder would overwrite checkpoint-000004 and leave the old checkpoint-000012 to resume
    for resume in ("null", "latest"):
        with pytest.raises(CheckpointError, match="holds another run, finished at step 12") as refused:
            train(_resolved(demo_project, **_train_args(out, max_train_steps=6, resume_from_checkpoint=resume)))
        assert "max_train_steps 12 -> 6" in str(refused.value) and "overwrite_output_dir=true" in str(refused.value)
    # another LoRA into the same folder, resumed as the containers do: refused too
    with pytest.raises(CheckpointError, match="lora_rank 8 -> 4"):
        train(
            _resolved(
                demo_project, **_train_args(out, max_train_steps=12, lora_rank=4, resume_from_checkpoint="latest")
            )
        )
    # the container restarted after the run finished: nothing retrained, nothing rewritten
    again = train(_resolved(demo_project, **_train_args(out, max_train_steps=12, resume_from_checkpoint="latest")))
    assert again.already_finished and again.global_step == 12 and again.lora_path == out / LORA
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == written

    replaced = train(_resolved(demo_project, **_train_args(out, max_train_steps=6, overwrite_output_dir="true")))
    assert replaced.global_step == 6 and not replaced.already_finished
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000004", "checkpoint-000006"]
    assert len((out / "logs" / "loss.jsonl").read_text().splitlines()) == 6
    assert json.loads((out / "run.json").read_text())["global_step"] == 6


# issue 11: the message a restarted container prints, and max_train_steps raised continues the run
@pytest.mark.slow
def test_a_finished_run_restarted_exits_0_saying_so_and_continues_when_max_train_steps_is_raised(
    demo_project, tmp_path
):
    out = tmp_path / "run"
    args = [f"--output_dir={out}", "--validation_disable=true", "--checkpointing_steps=2"]
    args += ["--resume_from_checkpoint=latest"]
    train(_resolved(demo_project, output_dir=out, validation_disable="true", checkpointing_steps=2, max_train_steps=4))
    lora = (out / LORA).stat().st_mtime_ns
    r = run_hvtune("train", "--config", str(demo_project), *args, "--max_train_steps=4")
    assert r.returncode == 0, r.stderr
    assert f"already finished at step 4, outputs in {out}" in r.stdout and (out / LORA).stat().st_mtime_ns == lora

    more = train(
        _resolved(
            demo_project,
            output_dir=out,
            validation_disable="true",
            checkpointing_steps=2,
            max_train_steps=6,
            resume_from_checkpoint="latest",
        )
    )
    assert more.global_step == 6 and not more.already_finished
    assert json.loads((out / "run.json").read_text())["global_step"] == 6
    assert [json.loads(line)["step"] for line in (out / "logs/loss.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]


# case 6
@pytest.mark.slow
def test_resume_with_another_lora_shape_is_one_line_and_a_changed_seed_is_announced(demo_project, tmp_path, capsys):
    out = tmp_path / "run"
    args = _train_args(out, max_train_steps=8, resume_from_checkpoint="latest")
    train(_resolved(demo_project, **args), max_steps_this_run=4)
    with pytest.raises(
        CheckpointError, match=re.escape("holds another run (checkpoints up to step 4): continue it with resume_")
    ):
        train(_resolved(demo_project, **{**args, "resume_from_checkpoint": "null"}))
    for key, value, shown in [
        ("lora_rank", 4, "lora_rank 8 -> 4"),
        ("lora_alpha", 2, "lora_alpha 8 -> 2.0"),
        ("lora_target_modules", '["to_q"]', "lora_target_modules 'simpletuner' -> ['to_q']"),
        ("model_flavour", "t2v-720p", "model_flavour 't2v-480p' -> 't2v-720p'"),
    ]:
        with pytest.raises(CheckpointError) as refused:
            train(_resolved(demo_project, **{**args, key: value}))
        message = str(refused.value)
        assert shown in message and "Set them back" in message and "another output_dir" in message, message
        assert "\n" not in message

    capsys.readouterr()
    resumed = train(_resolved(demo_project, **{**args, "seed": 7}), max_steps_this_run=1)
    assert resumed.global_step == 5 and "changed at resume: seed 42 -> 7" in capsys.readouterr().out

    # a checkpoint written before run identities were recorded: the shape mismatch is still one line
    state_file = sorted((out / "checkpoints").iterdir())[-1] / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({k: v for k, v in state.items() if k != "run"}))
    with pytest.raises(CheckpointError, match="does not fit this config"):
        train(_resolved(demo_project, **{**args, "lora_rank": 4}))


# case 13
def test_secret_looking_keys_are_masked_in_check_and_in_run_json(demo_project, tmp_path):
    config = json.loads(demo_project.read_text())
    config.update(hub_token="hf_SECRETVALUE123", wandb_api_key="wandb-SECRET-456", tokenizer_note="kept")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    r = run_hvtune("check", "--config", str(path))
    assert r.returncode == 0, r.stderr
    assert "SECRET" not in r.stdout + r.stderr and "hub_token" in r.stdout and "***" in r.stdout
    record = load_config(path, env={}).to_record()
    assert "SECRET" not in json.dumps(record) and record["unknown_keys"]["tokenizer_note"] == "kept"


# ---------------------------------------------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
    """A real, nearly empty 1 MiB filesystem (tmpfs; needs root, as in the test container)."""
    import subprocess

    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


# case 7
@pytest.mark.slow
def test_a_full_disk_is_refused_before_training_with_the_disk_and_the_space_needed(demo_project, small_disk):
    out = small_disk / "run"
    with pytest.raises(TrainError, match=r"disk full: a checkpoint and the final LoRA export needs about") as refused:
        train(_resolved(demo_project, **_train_args(out, max_train_steps=2)))
    assert str(small_disk) in str(refused.value) and "resume_from_checkpoint=latest" in str(refused.value)
    assert not (out / "logs" / "loss.jsonl").exists()  # not one step was spent


# case 7
def test_a_full_disk_during_cache_is_one_line_naming_it(tmp_path, small_disk):
    from hvtune.testing.demo import write_demo_project

    config = write_demo_project(tmp_path / "demo", task="t2v", clips=2, steps=2)
    with open(small_disk / "filler", "wb", buffering=0) as filler:  # fill it to the last byte
        try:
            while True:
                filler.write(b"\0" * 4096)
        except OSError:
            pass
    with pytest.raises(CacheError, match="disk full while writing the cache") as refused:
        build_cache(_resolved(config, cache_dir=small_disk / "cache"), progress=False)
    assert str(small_disk) in str(refused.value) and "hvtune cache" in str(refused.value)


# case 7
@pytest.mark.slow
def test_a_failed_final_export_keeps_the_last_step_and_a_rerun_exports_without_training(
    demo_project, tmp_path, monkeypatch
):
    import errno

    import hvtune.output.export as export

    def no_room(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "run"
    args = _train_args(out, max_train_steps=3, checkpointing_steps=2, resume_from_checkpoint="latest")
    with monkeypatch.context() as m:
        m.setattr(export, "save_run_lora", no_room)
        with pytest.raises(TrainError, match="disk full while writing the final LoRA export") as failed:
            train(_resolved(demo_project, **args))
    assert f"Step 3 is kept in {out / 'checkpoints' / 'checkpoint-000003'}" in str(failed.value)
    again = train(_resolved(demo_project, **args))
    assert again.global_step == 3 and (out / LORA).is_file()
    assert len((out / "logs" / "loss.jsonl").read_text().splitlines()) == 3  # the rerun trained nothing


# case 8
def test_check_runs_the_local_checks_fetch_cache_and_train_would_run_later(demo_project, tmp_path, monkeypatch, capsys):
    from hvtune.cli import main

    def check(*flags: str) -> tuple[int, str]:
        code = main(["check", "--config", str(demo_project), *flags])
        out = capsys.readouterr()
        return code, out.out + out.err

    assert check() == (0, check()[1]) and "config OK" in check()[1]
    empty = tmp_path / "empty-model"
    empty.mkdir()
    for flags, shown in [
        ([f"--pretrained_model_name_or_path={empty}"], f"{empty} is incomplete; missing"),
        ([f"--pretrained_model_name_or_path={tmp_path / 'nowhere'}"], "is not a directory"),
        ([f"--output_dir={demo_project}"], f"output_dir: {demo_project} is a file, not a folder"),
        ([f"--cache_dir={demo_project}/cache"], f"cache_dir: {demo_project} is a file, not a folder"),
    ]:
        code, text = check(*flags)
        assert code == 2 and shown in text and "config OK" not in text, text
    monkeypatch.setenv("HUNYUANVIDEO_TEXT_ENCODER_PATH", str(empty))
    code, text = check()
    assert code == 2 and "env:HUNYUANVIDEO_TEXT_ENCODER_PATH" in text and "incomplete" in text, text


# case 12
@pytest.mark.slow
def test_a_tiny_train_prints_no_line_that_hvtune_did_not_write(demo_project, tmp_path):
    out = tmp_path / "run"
    r = run_hvtune(
        "train",
        "--config",
        str(demo_project),
        f"--output_dir={out}",
        "--max_train_steps=2",
        "--validation_disable=true",
    )
    assert r.returncode == 0, r.stderr
    lines = [line.strip() for line in (r.stdout + r.stderr).replace("\r", "\n").splitlines() if line.strip()]
    foreign = [line for line in lines if not line.startswith(("train:", "done:", "notice:"))]
    assert not foreign, foreign
    assert any(line.startswith("done: 2 steps") for line in lines)
    log = out / "logs" / "libraries.log"  # routed, not hidden (what lands there depends on the installed libraries)
    assert not log.exists() or " WARNING " in log.read_text()
