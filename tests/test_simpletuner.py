"""SimpleTuner 4.10.1 configs mean the same in hvtune: its example configs pass `hvtune check`, buckets equal the
ones SimpleTuner's own code computes, every default either equals SimpleTuner's or is listed as kept on purpose,
and docs/SIMPLETUNER.md is generated from the policy table.

tests/data/simpletuner-4.10.1/ holds the HunyuanVideo, Wan and LTX example configs copied unchanged from the wheel
`simpletuner-4.10.1-py3-none-any.whl` (simpletuner/examples/<name>/config.json and
simpletuner/examples/multidatabackend-small-video-480p+2s24fps.json)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
import zipfile
from pathlib import Path

import pytest

from conftest import simpletuner_wheel_file
from hvtune.cli import main
from hvtune.config.schema import DatasetConfig, TrainConfig
from hvtune.config.settings import load_config
from hvtune.config.simpletuner import KEPT_DEFAULTS, render_markdown, simpletuner_defaults
from hvtune.config.simpletuner_keys import FEATURE_KEYS, TRAIN_KEYS
from hvtune.data.datasets import BucketRule, simpletuner_bucket
from hvtune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = Path(__file__).parent / "data" / "simpletuner-4.10.1"
HUNYUAN = EXAMPLES / "hunyuanvideo-1.5-t2v.peft-lora.config.json"
# keys that name another model or its data; the rest of a Wan/LTX example is what it shares with HunyuanVideo
OTHER_MODEL = {"model_family", "model_flavour", "pretrained_model_name_or_path", "data_backend_config"}


def _project(tmp_path: Path, config: dict) -> Path:
    videos = tmp_path / "videos"
    videos.mkdir(parents=True)
    backend = [
        {"id": "clips", "type": "local", "dataset_type": "video", "instance_data_dir": str(videos),
         "resolution": 480, "resolution_type": "pixel_area", "video": {"num_frames": 49}},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "type": "local", "cache_dir": "cache/text"},
    ]  # fmt: skip
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backend))
    config = {**config, "data_backend_config": str(tmp_path / "multidatabackend.json")}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_hunyuanvideo_example_passes_check_and_lists_each_ignored_key(tmp_path, capsys):
    config = json.loads(HUNYUAN.read_text())
    assert main(["check", "--config", str(_project(tmp_path, config))]) == 0
    out = capsys.readouterr()
    for key in ("hub_model_id", "compress_disk_cache", "disable_benchmark", "vae_batch_size"):
        assert f"{key} (" in out.err  # listed with its reason
    assert "1920x1080 (16:9) -> 704x384, 1080x1920 (9:16) -> 384x704" in out.out
    r = load_config(_project(tmp_path / "b", config), env={})
    t = r.train
    assert (t.num_train_epochs, t.max_train_steps, t.checkpointing_steps, t.validation_steps) == (0, 200, 100, 50)
    assert (t.optimizer, t.max_grad_norm, t.grad_clip_method, t.shift) == ("adamw_bf16", 0.1, "value", 5.0)


def test_hub_dataset_of_the_example_is_refused_with_its_reason(tmp_path):
    backend = json.loads((EXAMPLES / "multidatabackend-small-video-480p+2s24fps.json").read_text())
    (tmp_path / "m.json").write_text(json.dumps(backend))
    (tmp_path / "c.json").write_text(json.dumps({"data_backend_config": str(tmp_path / "m.json")}))
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.json", env={})
    assert "hub datasets are not supported" in str(e.value)


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.config.json") if "hunyuan" not in p.name))
def test_wan_and_ltx_examples_keys_shared_with_hunyuanvideo_pass(tmp_path, name):
    config = json.loads((EXAMPLES / name).read_text())
    refused = {k for k, p in {**TRAIN_KEYS, **FEATURE_KEYS}.items() if p.status == "refused"}
    refused |= {"lora_type", "lycoris_config"}  # a LyCORIS file of SimpleTuner's layout: tests/test_lycoris.py
    shared = {
        k: v
        for k, v in config.items()
        if k not in OTHER_MODEL | refused and (k in TRAIN_KEYS or k in TrainConfig.model_fields)
    }
    if shared.get("base_model_precision") not in ("no_change", "int8-torchao", "bf16"):
        shared.pop("base_model_precision", None)  # quantisers of other stacks: refused, tested below
    if shared.get("attention_mechanism", "diffusers") not in ("diffusers", "kohaku-fa-auto", "native", "flex"):
        shared.pop("attention_mechanism")  # a GPU or Apple kernel: refused on this CPU (tests/test_fast_path.py)
    if shared.get("context_parallel_comm_strategy") == "allgather":
        shared.pop("context_parallel_size")  # ring cannot train here: tests/test_context_parallel.py
    path = _project(tmp_path, shared)
    assert main(["check", "--config", str(path)]) == 0
    r = load_config(path, env={})
    assert r.train.num_train_epochs == 0 and r.train.train_steps_limit == config["max_train_steps"]


def test_every_example_key_is_classified_never_unknown():
    keys = {k for p in EXAMPLES.glob("*.config.json") for k in json.loads(p.read_text())}
    known = set(TRAIN_KEYS) | set(FEATURE_KEYS) | set(TrainConfig.model_fields) | set(simpletuner_defaults())
    assert keys - known == set()


def test_refused_key_is_an_error_unless_allowed(tmp_path):
    path = _project(tmp_path, {"tread_config": {"routes": []}, "ema_warmup_steps": 100})
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    assert "tread_config" in str(e.value) and "ema_warmup_steps" in str(e.value)
    r = load_config(path, env={}, argv=["--allow_unsupported_keys=true"])
    assert any("NOT applied" in n and "tread_config" in n for n in r.notices)


def test_unknown_video_key_and_disabled_dataset(tmp_path):
    path = _project(tmp_path, {})
    backend = json.loads((tmp_path / "multidatabackend.json").read_text())
    backend[0]["video"]["num_frame"] = 61  # typo
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backend))
    with pytest.raises(ConfigError, match=r"video\.num_frame"):
        load_config(path, env={})
    backend[0]["video"].pop("num_frame")
    backend[0]["disable"] = True
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backend))
    assert load_config(path, env={}).datasets[0].skipped


def test_seed_zero_and_minus_one_draw_a_seed(tmp_path):
    for asked in (0, -1):
        r = load_config(
            _project(tmp_path / str(asked + 2), {"seed": asked})
            if (tmp_path / str(asked + 2)).mkdir() is None
            else None,
            env={},
        )
        assert r.train.seed not in (0, -1) and any("drew seed" in n for n in r.notices)


def test_defaults_equal_simpletuners_or_are_kept_on_purpose():
    st = simpletuner_defaults()
    differ = {}
    for name, field in TrainConfig.model_fields.items():
        key = field.alias or name
        if key in st and field.default != st[key] and not (st[key] is None and field.default in (0, 0.0)):
            differ[key] = (field.default, st[key])
    assert set(differ) - set(KEPT_DEFAULTS) == set(), differ


def test_docs_table_is_generated_from_the_policy():
    assert (ROOT / "docs" / "SIMPLETUNER.md").read_text() == render_markdown()


# ------------------------------------------------------------------ buckets against SimpleTuner's own code


@pytest.fixture(scope="session")
def simpletuner_image(tmp_path_factory):
    """helpers/multiaspect/image.py from the real wheel (downloaded once, PyPI), with its StateTracker stubbed to
    hold the alignment setting."""
    wheel = simpletuner_wheel_file()
    source = zipfile.ZipFile(wheel).read("simpletuner/helpers/multiaspect/image.py").decode()
    args = types.SimpleNamespace(aspect_bucket_alignment=64, aspect_bucket_rounding=2)

    class StateTracker:
        @staticmethod
        def get_args():
            return args

        @staticmethod
        def get_resolution_by_aspect(**_):
            return None

        @staticmethod
        def set_resolution_by_aspect(**_):
            return None

    stub = types.ModuleType("simpletuner.helpers.training.state_tracker")
    stub.StateTracker = StateTracker
    tv = types.ModuleType("torchvision")
    tv.transforms = types.ModuleType("torchvision.transforms")
    saved = {k: sys.modules.get(k) for k in (stub.__name__, "torchvision")}
    sys.modules[stub.__name__], sys.modules["torchvision"] = stub, tv
    try:
        spec = importlib.util.spec_from_loader("st_image", loader=None)
        module = importlib.util.module_from_spec(spec)
        exec(compile(source, "simpletuner/helpers/multiaspect/image.py", "exec"), module.__dict__)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module.MultiaspectImage, args


SOURCES = [(1920, 1080), (1080, 1920), (1280, 720), (848, 480), (640, 480), (480, 640), (1000, 1000), (2560, 1080),
           (720, 1280), (1024, 768), (500, 300)]  # fmt: skip


@pytest.mark.parametrize("alignment", [16, 32, 64])
@pytest.mark.parametrize(("resolution", "kind"), [(480, "pixel_area"), (720, "pixel_area"), (480, "pixel"),
                                                   (720, "pixel"), (0.25, "area"), (0.5, "area")])  # fmt: skip
def test_buckets_equal_simpletuners_code(simpletuner_image, alignment, resolution, kind):
    image, args = simpletuner_image
    args.aspect_bucket_alignment = alignment
    mp = resolution * resolution / 1e6 if kind == "pixel_area" else resolution
    rule = BucketRule(mp if kind != "pixel" else resolution, "area" if kind != "pixel" else "pixel", alignment)
    for w, h in SOURCES:
        aspect = image.calculate_image_aspect_ratio((w, h))
        if kind == "pixel":
            target, _, _ = image.calculate_new_size_by_pixel_edge(aspect, resolution, (w, h))
        else:
            target, _, _ = image.calculate_new_size_by_pixel_area(aspect, mp, (w, h))
        if round(target[0] / target[1], 2) == 1.0:  # TrainingSample.calculate_target_size: square -> pixel_resolution
            continue
        assert simpletuner_bucket(w, h, rule) == tuple(target), (w, h)


# ------------------------------------------------------------------------------------- training keys, SimpleTuner's way


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**kw)


@pytest.mark.parametrize(
    ("name", "cls", "eps", "weight_decay", "betas"),
    [
        ("adamw_bf16", "AdamW", 1e-6, 1e-2, (0.9, 0.999)),  # AdamWBF16's default_settings
        ("torch-adamw", "AdamW", 1e-8, 1e-2, (0.9, 0.999)),
        ("optimi-adamw", "AdamW", 1e-6, 0.0, (0.9, 0.99)),
        ("bnb-adamw8bit", "AdamW8bit", 1e-6, 1e-2, (0.9, 0.999)),
        ("ao-adamw8bit", "AdamW8bit", 1e-6, 1e-2, (0.9, 0.999)),
    ],
)
def test_optimizer_names_and_settings_as_simpletuner(name, cls, eps, weight_decay, betas):
    import torch

    from hvtune.train.optim import build_optimizer

    opt = build_optimizer([torch.nn.Parameter(torch.zeros(4, 4))], _cfg(optimizer=name, learning_rate=1e-4))
    group = opt.param_groups[0]
    assert type(opt).__name__ == cls
    assert (group["eps"], group["weight_decay"], tuple(group["betas"])) == (eps, weight_decay, betas)
    # optimizer_config and optimizer_beta1/2 override them (adam_* are ignored: SimpleTuner feeds them to DeepSpeed)
    cfg = _cfg(optimizer=name, optimizer_config="weight_decay=0.0,eps=1e-7", optimizer_beta1=0.8, optimizer_beta2=0.95)
    group = build_optimizer([torch.nn.Parameter(torch.zeros(4, 4))], cfg).param_groups[0]
    assert (group["eps"], group["weight_decay"], tuple(group["betas"])) == (1e-7, 0.0, (0.8, 0.95))


def test_unavailable_optimizer_is_refused_with_the_nearest(tmp_path):
    with pytest.raises(
        ConfigError, match=r"prodigy.*SimpleTuner optimizer hvtune does not offer; the nearest it offers is adamw_bf16"
    ):
        load_config(_project(tmp_path, {"optimizer": "prodigy"}), env={})


@pytest.mark.parametrize("method", ["value", "norm"])
def test_gradient_clipping_methods(method):
    import torch
    from accelerate import Accelerator

    from hvtune.train.optim import clip_gradients

    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.tensor([3.0, -0.5, 0.1, -4.0])
    clip_gradients(Accelerator(cpu=True), [param], _cfg(max_grad_norm=1.0, grad_clip_method=method))
    if method == "value":  # SimpleTuner's default: each element clamped to [-1, 1]
        assert param.grad.tolist() == pytest.approx([1.0, -0.5, 0.1, -1.0])
    else:
        assert float(param.grad.norm()) == pytest.approx(1.0, rel=1e-5)
        assert param.grad[0] / param.grad[3] == pytest.approx(3.0 / -4.0)
    assert _cfg().grad_clip_method == "value" and _cfg().max_grad_norm == 2.0  # SimpleTuner's defaults


def test_flow_schedule_keys():
    import torch

    from hvtune.train.objective import TimestepSampling, counter_generator, sample_sigmas

    assert _cfg(flow_schedule_shift=0).shift == 1.0  # 0: no shift (custom_schedule.apply_flow_schedule_shift)
    assert _cfg(flow_use_uniform_schedule=True).timestep_mode == "uniform"
    scaled = sample_sigmas([0, 1], seed=3, epoch=0, shift=1.0, sampling=TimestepSampling(sigmoid_scale=2.0))
    draws = [torch.randn((), generator=counter_generator(3, 0, d, purpose="timestep")) for d in (0, 1)]
    assert scaled.tolist() == pytest.approx([float(torch.sigmoid(2.0 * x)) for x in draws])


def test_steps_epochs_intervals_and_validation_resolution(tmp_path):
    r = load_config(
        _project(tmp_path, {"num_train_epochs": 3, "max_train_steps": 0, "checkpoint_step_interval": 7,
                            "validation_step_interval": 9, "validation_resolution": "512, 1280x720"}),
        env={},
    )  # fmt: skip
    t = r.train
    assert (t.train_steps_limit, t.num_train_epochs, t.checkpointing_steps, t.validation_steps) == (None, 3, 7, 9)
    assert t.validation_resolution == "512x512" and any("validating at 512 only" in n for n in r.notices)
    with pytest.raises(ConfigError, match="num_train_epochs"):
        load_config(_project(tmp_path / "z", {"num_train_epochs": 0, "max_train_steps": 0}), env={})


def test_instance_prompt_keys(tmp_path):
    from hvtune.data.datasets import Captions

    clip = tmp_path / "a_red_ball.mp4"
    clip.write_bytes(b"")
    clip.with_suffix(".txt").write_text("bouncing")
    make = lambda **kw: Captions(  # noqa: E731
        DatasetConfig(id="d", instance_data_dir=str(tmp_path), **kw), tmp_path, None
    )
    assert make()(clip, clip.name) == ["a red ball"]  # SimpleTuner's default caption_strategy: filename
    assert make(caption_strategy="textfile", prepend_instance_prompt=True, instance_prompt="sks")(clip, clip.name) == [
        "sks bouncing"
    ]
    assert make(only_instance_prompt=True, instance_prompt=["sks one", "sks two"])(clip, clip.name) == [
        "sks one",
        "sks two",
    ]


def test_crop_keys(tmp_path):
    path = _project(tmp_path, {})
    backend = json.loads((tmp_path / "multidatabackend.json").read_text())
    backend[0].update({"crop": True, "crop_style": "random"})
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backend))
    with pytest.raises(ConfigError, match="crop_style"):
        load_config(path, env={})
    backend[0].update({"crop_style": "center", "crop_aspect": "square"})
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backend))
    from hvtune.data.buckets import dataset_bucket_rule

    r = load_config(path, env={})
    rule = dataset_bucket_rule(r.datasets[0], r)
    assert simpletuner_bucket(1920, 1080, rule) == simpletuner_bucket(1080, 1920, rule) == (512, 512)


def test_other_quantisers_refused_with_the_nearest_and_downsample_before_crop_refused(tmp_path):
    with pytest.raises(ConfigError, match="use int8-torchao"):
        load_config(_project(tmp_path, {"base_model_precision": "int8-quanto"}), env={})
    path = _project(tmp_path / "b", {"maximum_image_size": 1024, "target_downsample_size": 720})
    assert load_config(path, env={})  # without crop both have no effect, in SimpleTuner too
    backend = json.loads((tmp_path / "b" / "multidatabackend.json").read_text())
    backend[0].update({"crop": True, "crop_style": "centre"})
    (tmp_path / "b" / "multidatabackend.json").write_text(json.dumps(backend))
    with pytest.raises(ConfigError, match="target_downsample_size"):
        load_config(path, env={})


def test_seed_guide_check_shows_buckets_kept_defaults_and_frame_rate(monkeypatch, capsys):
    from conftest import SEED_GUIDE

    monkeypatch.chdir(SEED_GUIDE)
    assert main(["check", "--config", "config/config.json"]) == 0
    out = capsys.readouterr().out
    assert "buckets: 1920x1080 (16:9) -> 704x384, 1080x1920 (9:16) -> 384x704  [0.2304 megapixels" in out
    assert "video.frame_rate 24: resampled (SimpleTuner 4.10.1 does not resample)" in out
    seed_line = next(line for line in out.splitlines() if line.strip().startswith("seed "))
    assert "differs from SimpleTuner" in seed_line
    shift_line = next(line for line in out.splitlines() if line.strip().startswith("flow_schedule_shift "))
    assert "3.0" in shift_line and "differs" not in shift_line


def test_every_key_marked_same_is_read_by_hvtune():
    names = set(TrainConfig.model_fields) | {f.alias for f in TrainConfig.model_fields.values() if f.alias}
    assert [k for k, p in TRAIN_KEYS.items() if p.status == "same" and k not in names] == []
    dataset_names = set(DatasetConfig.model_fields)
    from hvtune.config.simpletuner_keys import DATASET_KEYS

    assert [k for k, p in DATASET_KEYS.items() if p.status == "same" and k not in dataset_names] == []


def test_top_level_instance_prompt_is_each_datasets_default(tmp_path):
    path = _project(tmp_path, {"instance_prompt": "sks", "prepend_instance_prompt": True})
    ds = load_config(path, env={}).datasets[0]
    assert (ds.instance_prompt, ds.prepend_instance_prompt) == ("sks", True)


def test_auto_shift_and_beta_schedule():
    import math

    import numpy as np

    from hvtune.train.objective import TimestepSampling, auto_shift, counter_seed, sample_sigmas

    cfg = _cfg(flow_schedule_shift=0, flow_schedule_auto_shift=True)
    assert cfg.shift == 0.0 and _cfg(flow_schedule_shift=0).shift == 1.0 and _cfg().shift == 3.0
    # custom_schedule.apply_flow_schedule_shift: seq_len = F * (H // 2) * (W // 2), flux calculate_shift, diffusers'
    # FlowMatchEulerDiscreteScheduler defaults (256, 4096, 0.5, 1.15) when the config has none
    seq = 16 * (30 // 2) * (53 // 2)
    expected = math.exp(0.5 + (seq - 256) * (1.15 - 0.5) / (4096 - 256))
    assert auto_shift((1, 32, 16, 30, 53), {}) == pytest.approx(expected)
    assert _cfg(flow_use_beta_schedule=True).timestep_mode == "beta"
    assert _cfg(flow_use_beta_schedule=True, flow_use_uniform_schedule=True).timestep_mode == "uniform"
    sigmas = sample_sigmas([0, 1, 2], seed=5, epoch=1, shift=1.0, sampling=TimestepSampling("beta", beta=(3.0, 1.5)))
    rng = [np.random.default_rng(counter_seed(5, 1, d, purpose="timestep")) for d in (0, 1, 2)]
    assert sigmas.tolist() == pytest.approx([r.beta(3.0, 1.5) for r in rng], rel=1e-6)


def test_top_level_caption_strategy_is_each_datasets_default(tmp_path):
    r = load_config(_project(tmp_path, {"caption_strategy": "textfile"}), env={})
    assert r.datasets[0].caption_strategy == "textfile"
    assert not any("caption_strategy not set" in n for n in r.notices)
    r = load_config(_project(tmp_path / "b", {}), env={})
    assert r.datasets[0].caption_strategy == "filename" and any("caption_strategy not set" in n for n in r.notices)
