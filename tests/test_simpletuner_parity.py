"""SimpleTuner parity, round two (issue 27), measured against what SimpleTuner 4.10.1's own code computes.

tests/data/simpletuner_semantics.json holds SimpleTuner's learning rate at every step for each schedule (its own
normalize_lr_scheduler_value and get_lr_scheduler, run from the wheel) and its HunyuanVideo LoRA target set (its
DEFAULT_LORA_TARGET through its get_lora_target_layers and peft, on the full-size transformer); written by
benchmarks/simpletuner_semantics.py. app/hvtune/config/simpletuner_examples.json holds what `hvtune check` says about
each of SimpleTuner's example configs (benchmarks/simpletuner_examples.py). The `wheel` tests rerun both scripts
against the real wheel (downloaded once from PyPI; skipped only when it cannot be fetched)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import simpletuner_wheel_file
from hvtune.cli import main
from hvtune.config.schema import DatasetConfig, TrainConfig
from hvtune.config.settings import load_config
from hvtune.config.simpletuner import example_results
from hvtune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SEMANTICS = json.loads((Path(__file__).parent / "data" / "simpletuner_semantics.json").read_text())
# of 150: before issue 27, 15; 28 until issue 22 refused the two Apple-Metal attention ones; 33 with
# musubi_blocks_to_swap run as group offload (issue 22) and context parallel with Ulysses (issue 23)
EXAMPLES_PASSING = 33


def _project(tmp_path: Path, config: dict, datasets: int = 1, **dataset) -> Path:
    backend = []
    for i in range(datasets):
        (tmp_path / f"videos{i}").mkdir(parents=True)
        backend.append(
            {
                "id": f"clips{i}",
                "type": "local",
                "dataset_type": "video",
                "instance_data_dir": str(tmp_path / f"videos{i}"),
                "video": {"num_frames": 49},
                **dataset,
            }
        )
    backend.append({"id": "text", "dataset_type": "text_embeds", "default": True, "type": "local"})  # fmt: skip
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backend))
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**config, "data_backend_config": str(tmp_path / "multidatabackend.json")}))
    return path


# ------------------------------------------------------------------------------------------- lr schedule, per step


@pytest.mark.parametrize(
    "case",
    SEMANTICS["schedules"],
    ids=[f"{c['lr_scheduler']}-warmup{c['lr_warmup_steps']}" for c in SEMANTICS["schedules"]],
)
def test_lr_of_every_step_equals_simpletuners(case):
    from hvtune.train.optim import build_lr_scheduler, build_optimizer

    cfg = TrainConfig(
        lr_scheduler=case["lr_scheduler"], lr_warmup_steps=case["lr_warmup_steps"],
        learning_rate=SEMANTICS["learning_rate"], lr_end=SEMANTICS["lr_end"], lr_power=SEMANTICS["lr_power"],
    )  # fmt: skip
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    scheduler = build_lr_scheduler(optimizer, cfg, total_steps=len(case["lr"]))
    trained_at = []
    for _ in case["lr"]:
        trained_at.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert trained_at == pytest.approx(case["lr"], rel=1e-6, abs=1e-12)


def test_check_shows_constant_with_a_warmup_runs_as_constant_with_warmup(tmp_path, capsys):
    path = _project(tmp_path, {"lr_scheduler": "constant", "lr_warmup_steps": 10})
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr()
    assert "lr_scheduler constant with lr_warmup_steps 10: runs as constant_with_warmup" in out.err
    assert "as in SimpleTuner: use constant_with_warmup" not in out.out + out.err  # the old, wrong notice
    r = load_config(_project(tmp_path / "b", {"lr_scheduler": "cosine_with_warmup", "lr_warmup_steps": 5}), env={})
    assert r.train.lr_scheduler == "cosine"


# ---------------------------------------------------------------------------------------------- LoRA target set


def _adapted(cfg: TrainConfig) -> list[str]:
    from diffusers import HunyuanVideo15Transformer3DModel

    from hvtune.model.architectures import transformer_config
    from hvtune.train.lora import add_lora

    with torch.device("meta"):
        transformer = HunyuanVideo15Transformer3DModel(**transformer_config("t2v-480p"))
    add_lora(transformer, cfg)
    return sorted(name for name, module in transformer.named_modules() if hasattr(module, "lora_A"))


def test_default_lora_targets_equal_simpletuners_on_the_full_model():
    from hvtune.train.lora import SIMPLETUNER_TARGETS

    assert list(SIMPLETUNER_TARGETS) == SEMANTICS["lora"]["target_modules"]
    simpletuner = SEMANTICS["lora"]["full_model"]
    assert len(simpletuner) == 440
    assert _adapted(TrainConfig()) == simpletuner  # the token refiner's attention included
    # hvtune's earlier set stays available by name: the main blocks without the last block's dead text modules
    main_blocks = _adapted(TrainConfig(lora_target_modules="main_blocks"))
    assert len(main_blocks) == 430
    assert set(simpletuner) - set(main_blocks) == {
        *(f"context_embedder.token_refiner.refiner_blocks.{i}.attn.{m}" for i in (0, 1)
          for m in ("to_q", "to_k", "to_v", "to_out.0")),
        "transformer_blocks.53.attn.to_add_out", "transformer_blocks.53.attn.add_q_proj",
    }  # fmt: skip


def test_unknown_target_preset_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"lora_target_modules = 'all'.*a preset \(simpletuner, main_blocks\)"):
        load_config(_project(tmp_path, {"lora_target_modules": "all"}), env={})
    with pytest.raises(ConfigError, match=r"peft_lora_target_modules.*lora_target_modules"):
        load_config(_project(tmp_path / "b", {"peft_lora_target_modules": ["to_q"]}), env={})


# ------------------------------------------------------------------- SimpleTuner values that used to be refused


def test_simpletuner_values_and_validation_only_keys_pass_check(tmp_path, capsys):
    config = {
        "skip_file_discovery": False, "validation_prompt": None, "validation_negative_prompt": None,
        "gradient_precision": "fp32", "eval_steps_interval": 5, "user_prompt_library": "prompts.json",
        "validation_guidance_rescale": 0.7, "checkpoints_rolling_total_limit": 3, "dynamo_backend": "inductor",
        "dynamo_mode": "default", "dynamo_use_regional_compilation": True, "tokenizer_max_length": 4096,
        "validation_num_video_frames": 39, "data_backend_sampling": "uniform",
    }  # fmt: skip
    path = _project(tmp_path, config, probability=1.0)
    assert main(["check", "--config", str(path)]) == 0
    err = capsys.readouterr().err
    assert "dynamo_backend" not in err  # compiled now, as SimpleTuner does (issue 22): no notice
    assert "validation_prompt null: no validation videos" in err
    assert "validation_num_video_frames 39: renders 37" in err
    t = load_config(path, env={}).train
    assert t.validation_disable and t.validation_negative_prompt == "" and t.checkpoints_rolling_total_limit == 3
    assert (t.dynamo_backend, t.dynamo_mode, t.dynamo_use_regional_compilation) == ("inductor", "default", True)


def test_probability_and_uniform_sampling_that_would_change_training_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"\.probability = 0\.5: dataset sampling probabilities"):
        load_config(_project(tmp_path, {}, probability=0.5), env={})
    with pytest.raises(ConfigError, match="data_backend_sampling = 'uniform'"):
        load_config(_project(tmp_path / "b", {"data_backend_sampling": "uniform"}, datasets=2), env={})


def test_min_frames_at_or_above_num_frames_as_simpletuner(tmp_path):
    from hvtune.data.buckets import bucket_frames
    from hvtune.data.issues import DatasetError

    r = load_config(_project(tmp_path, {}, video={"num_frames": 49, "min_frames": 81}), env={})
    ds = r.datasets[0]
    with pytest.raises(DatasetError, match="min_frames is 81"):
        bucket_frames(60, ds)  # shorter than min_frames: skipped, as SimpleTuner's metadata scan does
    assert bucket_frames(81, ds) == 49  # trains num_frames
    r = load_config(_project(tmp_path / "b", {}, video={"num_frames": 49, "min_frames": 33}), env={})
    assert any("SimpleTuner 4.10.1 refuses min_frames < num_frames" in n for n in r.notices)


# ----------------------------------------------------------------------------------- the right words for refusals


NEAREST = [("optimi-lion", "optimi-adamw"), ("soap", "adamw_bf16"), ("bnb-lion8bit", "bnb-adamw8bit"),
           ("torch-radam", "torch-adam")]  # fmt: skip


@pytest.mark.parametrize(("name", "nearest"), NEAREST)
def test_simpletuner_optimizers_hvtune_lacks_name_the_nearest(tmp_path, name, nearest):
    with pytest.raises(
        ConfigError, match=f"a SimpleTuner optimizer hvtune does not offer; the nearest it offers is {nearest}"
    ):
        load_config(_project(tmp_path, {"optimizer": name}), env={})


def test_unknown_optimizer_and_dataset_keys_are_told_apart_from_simpletuners(tmp_path):
    with pytest.raises(ConfigError, match=r"not a SimpleTuner 4\.10\.1 optimizer"):
        load_config(_project(tmp_path, {"optimizer": "adamw-typo"}), env={})
    with pytest.raises(ConfigError) as e:
        load_config(_project(tmp_path / "b", {}, max_num_samples=10, image_column="img", repeat=2), env={})
    text = str(e.value)
    assert "max_num_samples = 10: a SimpleTuner dataset option hvtune does not implement" in text
    assert "image_column = 'img': a SimpleTuner dataset option hvtune does not implement" in text
    assert "repeat = 2: not a key hvtune or SimpleTuner 4.10.1 reads here (a typo?)" in text


# ----------------------------------------------------------------------------------------- rolling checkpoints


def test_rolling_checkpoints_are_a_series_of_their_own(tmp_path):
    from hvtune.output.checkpoints import LoopState, find_checkpoint, list_checkpoints, save_checkpoint

    lora = {"w": torch.zeros(2)}
    for step, rolling in [(2, True), (4, True), (5, False), (6, True), (10, False), (12, True)]:
        keep = 2 if rolling else 1  # checkpoints_rolling_total_limit 2, checkpoints_total_limit 1
        save_checkpoint(tmp_path, LoopState(step, 0, 0, []), lora, {}, {}, keep, rolling=rolling)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["checkpoint-000006-rolling", "checkpoint-000010", "checkpoint-000012-rolling"]
    assert find_checkpoint(tmp_path, "latest").name == "checkpoint-000012-rolling"


def test_a_run_from_before_the_new_default_resumes_only_with_main_blocks():
    from hvtune.output.checkpoints import identity_changes, run_identity

    before = run_identity({**TrainConfig().model_dump(), "lora_target_modules": None}, None)  # null meant main_blocks
    blocking, _ = identity_changes(before, run_identity(TrainConfig().model_dump(), None))
    assert blocking == ["lora_target_modules 'main_blocks' -> 'simpletuner'"]
    same = run_identity(TrainConfig(lora_target_modules="main_blocks").model_dump(), None)
    assert identity_changes(before, same) == ([], [])


# ------------------------------------------------------------------------------------------ the example configs


def test_example_configs_count_and_no_refusal_for_a_value_simpletuner_accepts():
    results = example_results()
    assert len(results) == 150
    assert sum(not refused for refused in results.values()) == EXAMPLES_PASSING
    fixed = {"skip_file_discovery", "validation_prompt", "validation_negative_prompt", "gradient_precision",
             "lr_scheduler", "eval_steps_interval", "user_prompt_library", "validation_guidance_rescale",
             "checkpoints_rolling_total_limit", "peft_lora_target_modules"}  # fmt: skip
    refused = {key for keys in results.values() for key in keys}
    assert not refused & fixed and not any(k.startswith("dynamo_") for k in refused)
    assert "SimpleTuner's example configs" in (ROOT / "docs" / "SIMPLETUNER.md").read_text()


@pytest.fixture(scope="session")
def simpletuner_wheel(tmp_path_factory) -> Path:
    """The unpacked simpletuner 4.10.1 wheel (downloaded once into ~/.cache/hvtune-tests)."""
    wheel = simpletuner_wheel_file()
    root = tmp_path_factory.mktemp("simpletuner-wheel")
    zipfile.ZipFile(wheel).extractall(root)
    return root


@pytest.mark.slow
def test_wheel_simpletuners_own_code_still_computes_the_committed_schedules_and_targets(simpletuner_wheel, tmp_path):
    out = tmp_path / "semantics.json"
    script = ROOT / "benchmarks" / "simpletuner_semantics.py"
    env = {"PYTHONPATH": str(ROOT / "app"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, str(script), str(simpletuner_wheel), str(out)], capture_output=True, env=env)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    assert json.loads(out.read_text()) == SEMANTICS


@pytest.mark.slow
def test_wheel_example_configs_through_check_hold_the_count(simpletuner_wheel):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from simpletuner_examples import check_examples
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    results = check_examples(simpletuner_wheel)
    assert sum(not refused for refused in results.values()) == EXAMPLES_PASSING
    assert results == example_results()  # docs/SIMPLETUNER.md is rendered from these


def test_dataset_probability_field_default_is_simpletuners():
    assert DatasetConfig(id="d").probability == 1.0


@pytest.mark.slow
def test_training_warms_up_keeps_rolling_checkpoints_and_adapts_the_token_refiner(demo_project, tmp_path):
    """The real run: SimpleTuner's logged lr climbs 1e-5, 2e-5, ... with constant + lr_warmup_steps 10 (issue 27)."""
    from safetensors.torch import load_file

    from hvtune.trainer import train

    out = tmp_path / "run"
    settings = {"output_dir": out, "max_train_steps": 4, "learning_rate": 1e-4, "lr_scheduler": "constant",
                "lr_warmup_steps": 10, "checkpointing_steps": 100, "checkpointing_rolling_steps": 1,
                "checkpoints_rolling_total_limit": 2, "validation_disable": "true"}  # fmt: skip
    train(load_config(demo_project, env={}, argv=[f"--{k}={v}" for k, v in settings.items()]))
    logged = [json.loads(line)["lr"] for line in (out / "logs" / "loss.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([1e-5, 2e-5, 3e-5, 4e-5])
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    # the newest two rolling ones, and the last step (always checkpointed, before the final validation)
    assert checkpoints == ["checkpoint-000002-rolling", "checkpoint-000003-rolling", "checkpoint-000004"]
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(".token_refiner.refiner_blocks.0.attn.to_q." in key for key in lora)
