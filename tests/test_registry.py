"""Model registry: tiny model round trip, encoder path resolution, offline hub cache."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hvtune.config.schema import TrainConfig
from hvtune.flavours import FLAVOURS
from hvtune.model.registry import (
    ModelSourceError,
    load_text_encoders,
    load_transformer,
    load_vae,
    load_vision_encoder,
    plan_sources,
    resolve_model,
)
from hvtune.testing.tiny_model import write_tiny_model

APP = str(Path(__file__).resolve().parents[1] / "app")


def cfg(model: Path | str, **kw) -> TrainConfig:
    return TrainConfig(pretrained_model_name_or_path=str(model), **kw)


def test_tiny_model_is_byte_identical_for_a_seed_and_differs_across_seeds(tiny_t2v, tmp_path):
    again = write_tiny_model(tmp_path / "again", task="t2v", seed=0)
    other = write_tiny_model(tmp_path / "other", task="t2v", seed=1)
    files = sorted(p.relative_to(tiny_t2v) for p in tiny_t2v.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(tiny_t2v, again, [str(f) for f in files], shallow=False)
    assert mismatch == [] and errors == []
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert not filecmp.cmp(tiny_t2v / weights, other / weights, shallow=False)


def test_tiny_model_loads_through_the_registry(tiny_i2v):
    paths = resolve_model(cfg(tiny_i2v, model_flavour="i2v-480p"), env={})
    assert set(paths.components) == {
        "transformer",
        "vae",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "image_encoder",
        "feature_extractor",
    }
    transformer, vae = load_transformer(paths), load_vae(paths)
    assert transformer.config.in_channels == 65 and vae.config.latent_channels == 32
    assert vae.spatial_compression_ratio == 16 and vae.temporal_compression_ratio == 4
    text = load_text_encoders(paths)
    ids = text["tokenizer"]("a red ball", return_tensors="pt").input_ids
    assert text["text_encoder"](ids, output_hidden_states=True).hidden_states[-3].shape[-1] == 32
    vision = load_vision_encoder(paths)
    assert vision["image_encoder"].config.hidden_size == transformer.config.image_embed_dim
    # weights are the saved ones, not a fresh init
    reloaded = load_transformer(paths)
    for a, b in zip(transformer.parameters(), reloaded.parameters(), strict=True):
        assert torch.equal(a, b)


def test_t2v_does_not_need_a_vision_encoder(tiny_t2v):
    assert "image_encoder" not in resolve_model(cfg(tiny_t2v), env={}).components


def test_encoder_env_path_wins_over_config_and_model(tiny_i2v, tmp_path):
    text_root = tmp_path / "text"
    for sub in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        shutil.copytree(tiny_i2v / sub, text_root / sub)
    c = cfg(tiny_i2v, model_flavour="i2v-480p", text_encoder_path="/nonexistent/config-path")
    paths = resolve_model(c, env={"HUNYUANVIDEO_TEXT_ENCODER_PATH": str(text_root)})
    assert paths["text_encoder"] == text_root / "text_encoder"
    assert paths.origins["text_encoder"] == "env:HUNYUANVIDEO_TEXT_ENCODER_PATH"
    assert paths["image_encoder"] == tiny_i2v / "image_encoder"
    # without the env var the config key is next in line
    with pytest.raises(ModelSourceError, match="config:text_encoder_path: /nonexistent/config-path is not a directory"):
        resolve_model(c, env={})


def test_incomplete_encoder_dir_names_missing_files_before_loading(tiny_i2v, tmp_path):
    vision_root = tmp_path / "siglip"
    shutil.copytree(tiny_i2v / "image_encoder", vision_root / "image_encoder")
    (vision_root / "image_encoder" / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError) as e:
        resolve_model(
            cfg(tiny_i2v, model_flavour="i2v-480p"), env={"HUNYUANVIDEO_VISION_ENCODER_PATH": str(vision_root)}
        )
    msg = str(e.value)
    assert "env:HUNYUANVIDEO_VISION_ENCODER_PATH" in msg and str(vision_root) in msg
    assert "image_encoder/model.safetensors" in msg and "feature_extractor/preprocessor_config.json" in msg


def test_tencent_repo_maps_to_per_flavour_diffusers_layout():
    for flavour, spec in FLAVOURS.items():
        plan = plan_sources(TrainConfig(model_flavour=flavour), env={})
        assert plan["transformer"].location == spec.diffusers_repo
    assert "image_encoder" in plan_sources(TrainConfig(model_flavour="i2v-720p"), env={})


def _fake_hf_cache(home: Path, repo: str, model: Path, commit: str) -> None:
    repo_dir = home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)


def test_hub_id_resolves_offline_from_local_hf_cache(tiny_t2v, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    _fake_hf_cache(tmp_path / "hf", FLAVOURS["t2v-480p"].diffusers_repo, tiny_t2v, commit)
    env = {"PYTHONPATH": APP, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "hvtune", "fetch", f"--instance_data_dir={tmp_path}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert f"snapshots/{commit}/transformer" in out.stdout and "all components present" in out.stdout
    # a repo missing from the cache is a clear error, not a network attempt
    miss = subprocess.run(
        [sys.executable, "-m", "hvtune", "fetch", f"--instance_data_dir={tmp_path}", "--model_flavour=t2v-720p"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert miss.returncode == 2 and "not in the local Hugging Face cache" in miss.stderr
