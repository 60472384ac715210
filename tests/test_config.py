"""Config loading: the seed guide's files, layering, and one failing example per validation rule."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SEED_GUIDE
from hvtune.config.rules import check_device_support
from hvtune.config.settings import load_config
from hvtune.errors import ConfigError


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A copy of the seed guide's config.json + multidatabackend.json, cwd set like SimpleTuner's."""
    shutil.copytree(SEED_GUIDE, tmp_path / "p")
    monkeypatch.chdir(tmp_path / "p")
    return tmp_path / "p"


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def problems_of(*args, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(*args, env=kwargs.pop("env", {}), **kwargs)
    return [str(p) for p in e.value.problems]


def backends(project: Path) -> list[dict]:
    return json.loads((project / "config/multidatabackend.json").read_text())


def test_seed_guide_examples_load_unchanged(project):
    r = load_config("config/config.json", env={})
    assert r.train.model_flavour == "t2v-480p"
    assert r.train.optimizer == "adamw_bf16" and r.train.lora_rank == 16
    assert r.train.enable_group_offload and r.train.group_offload_type == "block_level"
    assert r.train.validation_resolution == "848x480"  # 854 rounded down to a multiple of 16
    assert any("854 rounded down to 848" in n for n in r.notices)
    video, text = r.datasets
    assert video.video.num_frames == 61 and video.video.min_frames == 61 and video.video.frame_rate == 24
    assert video.repeats == 10 and text.default and text.cache_dir == "cache/text/hunyuan"
    assert r.sources["lora_rank"] == "file:config/config.json" and r.sources["seed"] == "default"


def test_layers_env_then_flag_win(project):
    r = load_config(
        "config/config.json",
        env={"HVTUNE_LORA_RANK": "32", "HVTUNE_LEARNING_RATE": "2e-4", "HVTUNE_SEED": "7"},
        argv=["--lora_rank=8", "--enable_group_offload=false"],
    )
    assert r.train.lora_rank == 8 and r.sources["lora_rank"] == "flag:--lora_rank"
    assert r.train.learning_rate == 2e-4 and r.sources["learning_rate"] == "env:HVTUNE_LEARNING_RATE"
    assert r.train.seed == 7 and r.train.enable_group_offload is False


def test_no_config_file_env_only(tmp_path):
    (tmp_path / "clips").mkdir()
    r = load_config(None, env={"HVTUNE_INSTANCE_DATA_DIR": str(tmp_path / "clips"), "HVTUNE_MODEL_FLAVOUR": "i2v-720p"})
    assert (
        r.task == "i2v" and r.train.validation_resolution == "1280x720" and r.train.flow_schedule_shift == 3.0
    )  # SimpleTuner default
    assert [d.dataset_type for d in r.datasets] == ["video", "text_embeds"]


def test_unknown_keys_grouped_by_whether_they_change_training(project):
    cfg = json.loads((project / "config/config.json").read_text())
    cfg.update({"snr_gamma": 5.0, "hub_model_id": "me/lora", "push_to_hub": False, "lerning_rate": 1e-3})
    write(project / "config/config.json", cfg)
    with pytest.raises(ConfigError) as e:  # snr_gamma changes the loss in SimpleTuner: an error, not a notice
        load_config("config/config.json", env={})
    assert len(e.value.problems) == 1 and e.value.problems[0].key == "snr_gamma"
    r = load_config("config/config.json", env={}, argv=["--allow_unsupported_keys=true"])
    assert r.unknown == {"snr_gamma": 5.0, "hub_model_id": "me/lora", "push_to_hub": False, "lerning_rate": 1e-3}
    [ignored] = [n for n in r.notices if n.startswith("ignored, no effect")]
    assert "hub_model_id (hvtune never uploads" in ignored and "push_to_hub (hvtune never uploads" in ignored
    assert any(n.startswith("unknown") and "lerning_rate" in n for n in r.notices)
    assert any(n.startswith("NOT applied") and "snr_gamma" in n for n in r.notices)


def test_all_problems_reported_at_once(project):
    cfg = json.loads((project / "config/config.json").read_text())
    cfg.update(
        {
            "model_flavour": "t2v-1080p",
            "validation_num_video_frames": 0,
            "lora_rank": "big",
            "enable_model_cpu_offload": True,
            "group_offload_use_stream": True,
        }
    )
    write(project / "config/config.json", cfg)
    ds = backends(project)
    ds[0]["video"].update({"num_frames": 50, "bucket_strategy": "random", "min_frames": 81, "max_frames": 33})
    ds.append(dict(ds[0]))
    ds[1]["default"] = True
    ds.append({"id": "more-embeds", "type": "local", "dataset_type": "text_embeds", "default": True})
    write(project / "config/multidatabackend.json", ds)
    msgs = "\n".join(problems_of("config/config.json"))
    for expected in [
        "model_flavour = 't2v-1080p': must be one of t2v-480p, t2v-720p, i2v-480p, i2v-720p",
        "validation_num_video_frames = 0: (frames - 1) % 4 must be 0",
        "lora_rank = 'big'",
        "group_offload_use_stream = True: never combine with enable_model_cpu_offload",
        "enable_model_cpu_offload = True: never combine with enable_group_offload",
        "video.num_frames = 50: (frames - 1) % 4 must be 0",
        "video.bucket_strategy = 'random': must be aspect_ratio or resolution_frames",
        "video.max_frames = 33: must be >= num_frames",
        "id = 'my-video-dataset': dataset ids must be unique",
        "exactly one enabled text_embeds dataset",
    ]:
        assert expected in msgs, f"missing {expected!r} in:\n{msgs}"
    assert "config/config.json: model_flavour" in msgs  # names the file
    assert "config/multidatabackend.json: [0] id=my-video-dataset.video.num_frames" in msgs


def test_malformed_json_names_line_and_column(project):
    write(project / "config/config.json", '{\n  "lora_rank": 16,\n  "model_flavour" "t2v-480p"\n}')
    (msg,) = problems_of("config/config.json")
    assert "config/config.json" in msg and "line 3, column 19" in msg


def test_missing_dataset_dir(project):
    shutil.rmtree(project / "datasets/videos")
    (msg,) = problems_of("config/config.json")
    assert "instance_data_dir = 'datasets/videos': directory not found" in msg


def test_resolution_rounding_not_rejection(project):
    ds = backends(project)
    ds[0]["resolution"] = "854x480"
    write(project / "config/multidatabackend.json", ds)
    r = load_config("config/config.json", env={}, argv=["--validation_resolution=1000x500"])
    assert r.datasets[0].resolution == "848x480" and r.train.validation_resolution == "992x496"


def test_stream_without_group_offload_is_a_problem(project):
    msgs = problems_of("config/config.json", argv=["--enable_group_offload=false", "--group_offload_use_stream=true"])
    assert any("group_offload_use_stream = True: only applies with enable_group_offload" in m for m in msgs)


def test_stream_offload_needs_cuda(project):
    r = load_config("config/config.json", env={}, argv=["--group_offload_use_stream=true"])
    for device in ("cpu", "rocm"):
        (p,) = check_device_support(r.train, device)
        assert "needs an NVIDIA CUDA GPU" in str(p) and device in str(p)
    assert check_device_support(r.train, "cuda") == []


def test_check_command_exit_codes(project):
    env_cmd = [sys.executable, "-m", "hvtune", "check", "--config", "config/config.json"]
    app = str(Path(__file__).resolve().parents[1] / "app")
    ok = subprocess.run([*env_cmd, "--lora_rank=4"], capture_output=True, text=True, env={"PYTHONPATH": app})
    assert ok.returncode == 0, ok.stderr
    assert "lora_rank" in ok.stdout and "flag:--lora_rank" in ok.stdout and "file:config/config.json" in ok.stdout
    bad = subprocess.run(
        [*env_cmd, "--validation_num_video_frames=0"], capture_output=True, text=True, env={"PYTHONPATH": app}
    )
    assert bad.returncode == 2 and "validation_num_video_frames = 0" in bad.stderr
    assert not list(project.glob("output*"))  # nothing written


def test_a_dataset_without_an_id_is_one_problem_naming_the_file_and_entry(project):
    backends = project / "config" / "multidatabackend.json"
    entries = json.loads(backends.read_text())
    del entries[0]["id"]
    backends.write_text(json.dumps(entries))
    with pytest.raises(ConfigError) as refused:
        load_config(project / "config" / "config.json", env={})
    assert [str(p) for p in refused.value.problems if p.key.endswith(".id")] == [
        "config/multidatabackend.json: [0].id = None: required, but missing"
    ]


def test_lora_alpha_zero_is_refused_not_trained_as_a_lora_that_learns_nothing(project):
    # peft scales the LoRA by alpha / rank: at 0 it adds nothing and its gradients are 0
    cfg = json.loads((project / "config/config.json").read_text())
    write(project / "config/config.json", {**cfg, "lora_alpha": 0})
    (msg,) = problems_of("config/config.json")
    assert "config/config.json: lora_alpha = 0" in msg and "greater than 0" in msg
    r = load_config("config/config.json", env={}, argv=["--lora_alpha=8"])
    assert r.train.lora_alpha == 8
