"""Issue 25, nothing silently wrong, round two: `check` refuses all `train` would before step 1, dataset changes after
caching are seen, the printed repair repairs, a NaN names its samples, secrets stay masked, one `train` per folder.
Each case is met as a user meets it: the real command (in-process through `cli.main`, or a subprocess), real files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_hvtune
from hvtune.cache.build import build_cache
from hvtune.cache.manifest import load_manifest
from hvtune.cache.store import CacheError
from hvtune.cache.verify import print_verify
from hvtune.cli import main
from hvtune.config.settings import ConfigError, load_config
from hvtune.locks import exclusive_lock
from hvtune.run_files import RunFiles


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A demo project of our own (tiny t2v model, 4 clips, batch 1) with its cache built: tests change and repair it."""
    from hvtune.testing.demo import write_demo_project

    config = write_demo_project(tmp_path_factory.mktemp("round2"), task="t2v", clips=4, steps=4)
    data = json.loads(config.read_text())
    data.update(train_batch_size=1, validation_disable=True)
    config.write_text(json.dumps(data))
    build_cache(load_config(config, env={}), progress=False)
    return config


def _clips_dir(config: Path) -> Path:
    backend = json.loads(Path(json.loads(config.read_text())["dataset_backend_config"]).read_text())
    return Path(next(d["instance_data_dir"] for d in backend if d.get("instance_data_dir")))


def _command(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


# ------------------------------------------------------------------------- check refuses all that train would refuse


def _sharded_model(config: Path, root: Path) -> Path:
    """A copy of the project's tiny model whose transformer is in three shards with an index, as the hub ships it."""
    from safetensors.torch import load_file, save_file

    model = root / "sharded-model"
    shutil.copytree(json.loads(config.read_text())["pretrained_model_name_or_path"], model)
    folder = model / "transformer"
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    names, weight_map = sorted(tensors), {}
    for i in range(3):
        shard = f"diffusion_pytorch_model-0000{i + 1}-of-00003.safetensors"
        part = names[i::3]
        save_file({n: tensors[n].contiguous() for n in part}, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return model


def _refusals(config: Path, tmp_path: Path):
    """(flags, what both commands must say): every refusal `train` makes before its first step."""
    model = _sharded_model(config, tmp_path)
    shards = sorted((model / "transformer").glob("*-of-*.safetensors"))
    shards[0].unlink()  # listed in the index, missing
    shards[1].write_bytes(shards[1].read_bytes()[:-64])  # a download cut short
    busy = tmp_path / "busy-run"
    return busy, [
        ([f"--pretrained_model_name_or_path={model}"], [str(shards[0]), "missing", str(shards[1]), "damaged"]),
        (["--train_batch_size=1000"], ["no full batch of 1000 samples in any bucket"]),
        (['--lora_target_modules=["to_q", "proj_in"]'], ["no ComfyUI name for LoRA modules: context_embedder.proj_in"]),
        (['--lora_target_modules=["no_such_layer"]'], ["match no layer of the transformer"]),
        (["--resolution=7", "--resolution_type=pixel"], ["resolution = 7", "between 16 and 4096 pixels"]),
        ([f"--output_dir={busy}"], [f"output_dir {busy} is in use by another `hvtune train`: pid {os.getpid()}"]),
    ]


@pytest.mark.slow
def test_check_refuses_every_refusal_train_makes_before_its_first_step(project, tmp_path, capsys):
    busy, cases = _refusals(project, tmp_path)
    out = tmp_path / "run"
    with exclusive_lock(RunFiles(busy).train_lock, "hvtune train", str):  # another train holds this folder
        for flags, said in cases:
            args = ["--config", str(project), f"--output_dir={out}", *flags]
            train_code, train_text = _command(capsys, "train", *args)
            check_code, check_text = _command(capsys, "check", *args)
            for text in (train_text, check_text):
                assert all(s in text for s in said), (flags, text)
            assert (train_code, check_code) == (2, 2) and "config OK" not in check_text, (flags, check_text)
            assert "Traceback" not in train_text + check_text
            assert not RunFiles(out).loss_log.exists()  # refused before step 1
    code, text = _command(capsys, "check", "--config", str(project), f"--output_dir={out}")
    assert code == 0 and "config OK" in text, text
    # the cache no longer fits the clips: both refuse, naming the file and `hvtune cache`
    added = _clips_dir(project) / "late-arrival.mp4"
    shutil.copy(sorted(_clips_dir(project).glob("*.mp4"))[0], added)
    try:
        for command in ("train", "check"):
            code, text = _command(capsys, command, "--config", str(project), f"--output_dir={out}")
            assert code == 2 and f"{added}: added since the cache was built" in text, (command, text)
            assert f"hvtune cache --config {project}" in text
    finally:
        added.unlink()
    # before any cache: the batch is checked on the clips as `hvtune cache` will find them
    fresh = [f"--cache_dir={tmp_path / 'no-cache-yet'}", f"--output_dir={out}"]
    code, text = _command(capsys, "check", "--config", str(project), *fresh, "--train_batch_size=5")
    assert code == 2 and "no full batch of 5 samples in any bucket (4 samples" in text, text
    assert not (tmp_path / "no-cache-yet").exists()  # check creates no folder


@pytest.mark.parametrize("resolution", [7, 0, -64, 100000, "7x7", 0.0])
def test_a_dataset_resolution_out_of_range_is_refused_at_config_time_not_rounded_to_0(tmp_path, resolution):
    (tmp_path / "clips").mkdir()
    kind = "area" if isinstance(resolution, float) else "pixel"
    backend = [
        {"id": "clips", "instance_data_dir": "clips", "resolution": resolution, "resolution_type": kind},
        {"id": "text", "dataset_type": "text_embeds", "default": True},
    ]
    (tmp_path / "mdb.json").write_text(json.dumps(backend))
    (tmp_path / "config.json").write_text(json.dumps({"data_backend_config": "mdb.json"}))
    with pytest.raises(ConfigError) as refused:
        load_config(tmp_path / "config.json", env={})
    text = str(refused.value)
    assert f"[0] id=clips.resolution = {resolution!r}" in text and "rounded" not in text, text
    assert "between 16 and 4096" in text


def test_a_resolution_in_range_still_loads(tmp_path):
    (tmp_path / "clips").mkdir()
    backend = [
        {"id": "clips", "instance_data_dir": "clips", "resolution": 50, "resolution_type": "pixel"},
        {"id": "text", "dataset_type": "text_embeds", "default": True},
    ]
    (tmp_path / "mdb.json").write_text(json.dumps(backend))
    (tmp_path / "config.json").write_text(json.dumps({"data_backend_config": "mdb.json"}))
    resolved = load_config(tmp_path / "config.json", env={})
    assert resolved.datasets[0].resolution == 48 and any("50 rounded down to 48" in n for n in resolved.notices)


# ----------------------------------------------------------------------------------- the datasets after the cache


def _moved_aside(path: Path, tmp_path: Path) -> Path:
    aside = tmp_path / "aside" / path.name
    aside.parent.mkdir(exist_ok=True)
    shutil.move(path, aside)
    return aside


@pytest.mark.slow
def test_a_deleted_clip_a_deleted_caption_and_an_added_clip_are_seen_by_train(project, tmp_path, capsys):
    clips = _clips_dir(project)
    videos = sorted(p for p in clips.iterdir() if p.suffix == ".mp4")
    before = load_manifest(load_config(project, env={})).samples
    out = [f"--output_dir={tmp_path / 'run'}"]
    added = clips / "new-clip.mp4"
    caption = videos[1].with_suffix(".txt")
    changes = [
        (videos[0], "deleted since the cache was built", lambda: _moved_aside(videos[0], tmp_path)),
        (caption, "deleted since the cache was built", lambda: _moved_aside(caption, tmp_path)),
        (added, "added since the cache was built", lambda: shutil.copy(videos[2], added)),
    ]
    for path, said, change in changes:
        aside = change()
        code, text = _command(capsys, "train", "--config", str(project), *out)
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1, text  # one line: the files and the command that updates the cache
        assert f"{path}: {said}" in errors[0] and f"hvtune cache --config {project}" in errors[0], text
        assert "train_on_cache_as_is: true" in errors[0]
        # asked for: training on the cache as it is, announced
        resolved = load_config(project, env={}, argv=["--train_on_cache_as_is=true"])
        assert [s.id for s in load_manifest(resolved).samples] == [s.id for s in before]
        assert (
            f"train_on_cache_as_is: training on the cache as it was built; not seen: {path}" in capsys.readouterr().err
        )
        if path == added:
            added.unlink()
        else:
            shutil.move(aside, path)
    assert load_manifest(load_config(project, env={})).samples_hash  # all back: nothing to refuse
    # a training box with the cache and without the clips: no clip of the dataset here is no change
    away = [_moved_aside(v, tmp_path) for v in videos]
    try:
        assert [s.id for s in load_manifest(load_config(project, env={})).samples] == [s.id for s in before]
    finally:
        for video, aside in zip(videos, away, strict=True):
            shutil.move(aside, video)


@pytest.mark.slow
def test_the_cache_command_updates_the_cache_after_a_clip_is_added(project, tmp_path):
    clips = _clips_dir(project)
    added = clips / "added.mp4"
    source = sorted(clips.glob("*.mp4"))[0]
    shutil.copy(source, added)
    shutil.copy(source.with_suffix(".txt"), added.with_suffix(".txt"))
    resolved = load_config(project, env={})
    try:
        with pytest.raises(CacheError, match="added since the cache was built"):
            load_manifest(resolved)
        build_cache(resolved, progress=False)
        assert "added.mp4" in {Path(s.source).name for s in load_manifest(resolved).samples}
    finally:
        added.unlink()
        added.with_suffix(".txt").unlink()
        build_cache(resolved, progress=False)
    assert "added.mp4" not in {Path(s.source).name for s in load_manifest(resolved).samples}


# ---------------------------------------------------------------------------------- a repair that repairs, NaN


def _flip_data_bytes(path: Path, fill: bytes | None = None) -> None:
    """Same size, header intact: bytes of the tensor data changed (flipped, or overwritten with `fill`)."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    if fill is None:
        middle = (start + len(data)) // 2
        data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    else:
        data[start:] = fill * (len(data) - start)
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_the_repair_verify_prints_repairs_an_entry_with_flipped_bytes(project, capsys):
    resolved = load_config(project, env={})
    manifest = load_manifest(resolved)
    damaged = manifest.latent_path(manifest.samples[2])
    size = damaged.stat().st_size
    _flip_data_bytes(damaged)
    assert damaged.stat().st_size == size and load_manifest(resolved)  # the cheap checks cannot see it
    assert print_verify(resolved) == 1
    said = capsys.readouterr().out
    assert str(damaged) in said and f"to repair: run `hvtune cache --config {project}`" in said
    code, _ = _command(capsys, "cache", "--config", str(project))  # the repair verify printed
    assert code == 0
    assert print_verify(resolved) == 0 and "every entry intact" in capsys.readouterr().out


@pytest.mark.slow
def test_a_nan_loss_names_the_samples_of_its_step_and_suggests_cache_verify_first(project, tmp_path, capsys):
    from hvtune.train.batches import plan_epoch

    resolved = load_config(project, env={})
    manifest = load_manifest(resolved)
    first = plan_epoch(manifest, global_batch_size=1, seed=resolved.train.seed, epoch=0)[0][0][0]
    sample = manifest.samples[first]
    entry = manifest.latent_path(sample)
    original = entry.read_bytes()
    _flip_data_bytes(entry, fill=b"\xff")  # every value NaN, size and header as they were
    try:
        code, text = _command(capsys, "train", "--config", str(project), f"--output_dir={tmp_path / 'run'}")
    finally:
        entry.write_bytes(original)
    assert code == 1 and f"loss became nan at step 1 on sample(s) {sample.id}" in text, text[-2000:]
    assert text.index(f"hvtune cache verify --config {project}") < text.index("lower learning_rate"), text


# --------------------------------------------------------------------------------------------------------- secrets

SECRET_KEYS = [
    "mysecretstuff", "clientSecret", "client_secret", "apiToken", "accessToken", "hfToken", "HF_TOKEN", "hub_token",
    "HUGGING_FACE_HUB_TOKEN", "wandb_api_key", "WANDB_API_KEY", "openai_key", "OPENAI_API_KEY", "x-api-key",
    "apikey", "ApiKey", "aws_secret_access_key", "AWS_ACCESS_KEY_ID", "aws_session_token", "password", "DB_PASSWORD",
    "passwd", "userPassword", "gcpCredentials", "google_application_credentials", "Authorization", "auth",
    "oauth_token", "db_pwd",
    "basicAuth", "bearerToken", "refresh_token", "id_token", "privateKey", "private_key", "ssh_key", "secret",
    "SECRET_KEY", "slack_webhook_url", "comet_api_key", "neptune_api_token", "github_pat", "githubToken",
]  # fmt: skip
PLAIN_KEYS = [
    "tokenizer_max_length", "caption_tokens", "allow_unsupported_keys", "caption_key", "lora_key", "sort_key",
    "author", "keyframes", "monkey_patch", "vae_cache_ondemand", "max_tokens_per_caption", "tracker_run_name",
    "unknown_keys",
]  # fmt: skip


def test_secret_key_spellings_are_masked_and_ordinary_keys_are_not():
    from hvtune.masking import is_secret_key, mask_secrets

    assert [k for k in SECRET_KEYS if not is_secret_key(k)] == []
    assert [k for k in PLAIN_KEYS if is_secret_key(k)] == []
    masked = mask_secrets({k: "value-123" for k in SECRET_KEYS + PLAIN_KEYS})
    assert {k for k, v in masked.items() if v == "***"} == set(SECRET_KEYS)
    # the run record's table of unknown keys stays a table: its secrets are masked inside it
    record = mask_secrets({"unknown_keys": {"mysecretstuff": "x", "lora_note": "kept"}, "api_keys": ["k1", "k2"]})
    assert record == {"unknown_keys": {"mysecretstuff": "***", "lora_note": "kept"}, "api_keys": "***"}


def test_no_real_config_key_is_masked_but_the_webhook_config():
    from hvtune.config.schema import DatasetConfig, TrainConfig, VideoOptions
    from hvtune.config.simpletuner_keys import DATASET_KEYS
    from hvtune.masking import mask_secrets

    options = json.loads((Path(__file__).parents[1] / "app/hvtune/config/simpletuner_options.json").read_text())
    keys = set(options["options"]) | set(TrainConfig.model_fields) | set(DatasetConfig.model_fields)
    keys |= set(VideoOptions.model_fields) | set(DATASET_KEYS)
    as_text = mask_secrets({k: "some/value" for k in keys})
    assert {k for k, v in as_text.items() if v == "***"} == {"webhook_config", "webhook_reporting_interval"}
    # a number or a switch is never a secret: the interval stays visible
    assert mask_secrets({"webhook_reporting_interval": 30, "allow_unsupported_keys": True}) == {
        "webhook_reporting_interval": 30,
        "allow_unsupported_keys": True,
    }


TOKENS = {
    "hf": "hf_" + "aB3" * 10,
    "openai": "sk-proj-" + "x9Y" * 10,
    "github": "ghp_" + "Zq7" * 12,
    "aws": "AKIA" + "ABCDEFGHIJKLMNOP",
    "gitlab": "glpat-" + "k2L" * 7,
}


def test_token_shaped_values_are_masked_under_any_key():
    from hvtune.masking import mask_secrets

    for name, token in TOKENS.items():
        masked = mask_secrets({"validation_prompt": f"a cat, {token} in the corner", "note": [token]})
        assert token not in json.dumps(masked) and "a cat" in masked["validation_prompt"], name


@pytest.mark.slow
def test_secrets_stay_out_of_check_run_json_status_json_and_the_tensorboard_hparams(project, tmp_path):
    config = json.loads(project.read_text())
    secrets = {"mysecretstuff": "S3CRET-one", "clientSecret": "S3CRET-two", "apiToken": "S3CRET-three"}
    config.update(secrets, hfToken="S3CRET-four", note=TOKENS["github"], max_train_steps=1, report_to="tensorboard")
    config.update(output_dir=str(tmp_path / "run"))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    check = run_hvtune("check", "--config", str(path))
    assert check.returncode == 0 and "mysecretstuff" in check.stdout, check.stderr
    trained = run_hvtune("train", "--config", str(path))
    assert trained.returncode == 0, trained.stderr[-2000:]
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and p.suffix != ".safetensors"]
    assert any("tfevents" in p.name for p in written) and RunFiles(tmp_path / "run").status.is_file()
    for text in [check.stdout + check.stderr, trained.stdout + trained.stderr, *(p.read_bytes() for p in written)]:
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        assert "S3CRET" not in text and TOKENS["github"] not in text


# ----------------------------------------------------------------------------------------------- one train a folder


@pytest.mark.slow
def test_a_second_train_into_the_same_output_dir_is_refused_naming_the_first_and_a_killed_ones_lock_is_taken_over(
    project, tmp_path
):
    out = tmp_path / "run"
    args = ["train", "--config", str(project), f"--output_dir={out}", "--checkpointing_steps=1000"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "app")}
    first = subprocess.Popen(
        [sys.executable, "-m", "hvtune", *args, "--max_train_steps=100000"], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        lock = RunFiles(out).train_lock
        deadline = time.monotonic() + 300
        while not (lock.is_file() and lock.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.5)
        second = run_hvtune(*args, "--max_train_steps=2", "--seed=9")
        assert first.poll() is None, "the first run ended before the second started"
        assert second.returncode == 2, second.stderr[-2000:]
        line = second.stderr.strip().splitlines()[-1]
        assert f"is in use by another `hvtune train`: pid {first.pid} on host" in line, second.stderr
        status = RunFiles(out).status
        if status.is_file():  # the refused run wrote nothing there: status.json is still the first run's
            assert json.loads(status.read_text()).get("pid") == first.pid
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = run_hvtune(*args, "--max_train_steps=1", "--overwrite_output_dir=true")
    assert third.returncode == 0, third.stderr[-2000:]
    said = third.stdout + third.stderr
    assert f"took over {RunFiles(out).train_lock} from pid {first.pid}" in said, said
    assert RunFiles(out).train_lock.read_text() == ""  # released on exit


def test_a_refused_value_under_a_secret_key_is_masked_in_the_error(tmp_path):
    """A config error quotes the value it refuses: under a secret key (or shaped like a token) it is masked."""
    (tmp_path / "clips").mkdir()
    config = tmp_path / "config.json"
    token = "hf_" + "a1b2c3d4e5" * 3
    config.write_text(json.dumps({"instance_data_dir": "clips", "lora_rank": token, "hub_token": token}))
    result = run_hvtune("check", "--config", str(config), env={"HVTUNE_LORA_ALPHA": "sk-" + "x9" * 15})
    assert result.returncode == 2, result.stderr
    assert "lora_rank" in result.stderr and "lora_alpha" in result.stderr
    assert token not in result.stdout + result.stderr and "x9x9x9" not in result.stdout + result.stderr
