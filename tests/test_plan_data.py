"""`hvtune plan`'s data part on real clips: the bucket it plans is the one the cache build assigns, its cache disk
prediction matches a real tiny build, and without clips it says so and falls back to the usual aspects."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from clips import write_clip
from hvtune.cache.build import build_cache
from hvtune.cache.manifest import load_manifest
from hvtune.config.settings import load_config
from hvtune.model.architectures import TINY_TRANSFORMER_CONFIG
from hvtune.plan.dataset import planned_data
from hvtune.plan.disk import CacheDims, CaptionTokens, disk_lines, glyph_text, gpu_cache_dtype, predict_cache_bytes
from hvtune.plan.shapes import CAPTION_TOKENS, largest_bucket, shape_for
from test_cache import encodable

SEED_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "seed-project" / "config" / "config.json"
# (file, source size, frames, caption): at resolution 32 px edge, alignment 16, num_frames 9 / min_frames 5, the
# 16:9 clips bucket at 64x32 (the most pixels) but c_wide_short has 5 frames; the 3:4 ones at 32x48 with 9 frames,
# which gives the most latent tokens (32*48*3 > 64*32*2): a plan that looked at pixels alone would pick 64x32
CLIPS = [
    ("c_wide_short.mp4", (64, 36), 5, "a grey square"),
    ("c_tall.mp4", (48, 64), 9, 'a sign that reads "HELLO"'),
    ("c_tall_2.mp4", (60, 80), 9, "grey"),
    ("c_square.mp4", (40, 40), 9, "a much longer caption " * 6),
]


def write_project(root: Path, model: Path, *, flavour: str = "t2v-480p", data: Path | None = None) -> Path:
    data = data or root / "clips"
    backend = [
        {"id": "clips", "dataset_type": "video", "instance_data_dir": str(data), "resolution": 32,
         "resolution_type": "pixel", "caption_strategy": "textfile", "video": {"num_frames": 9, "min_frames": 5}},
        {"id": "text", "dataset_type": "text_embeds", "default": True},
    ]  # fmt: skip
    (root / "mdb.json").write_text(json.dumps(backend))
    config = {
        "pretrained_model_name_or_path": str(model),
        "model_flavour": flavour,
        "cache_dir": str(root / "cache"),
        "data_backend_config": str(root / "mdb.json"),
        "validation_prompt": 'a sign that reads "HV"',
        "validation_negative_prompt": "blurry",
        "validation_resolution": "48x32",
        "aspect_bucket_alignment": 16,
    }
    (root / "config.json").write_text(json.dumps(config))
    return root / "config.json"


def write_clips(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, size, frames, caption) in enumerate(CLIPS):
        write_clip(folder / name, frames=frames, size=size, fps=8 + i)
        (folder / name).with_suffix(".txt").write_text(caption)
    return folder


def tokens_of(bucket: tuple[int, int, int]) -> int:
    w, h, f = bucket
    return w * h * ((f - 1) // 4 + 1)


def tiny_dims(model: Path) -> CacheDims:
    """The tiny model's widths; its SigLIP tokens from its config (patches of its image size)."""
    t = TINY_TRANSFORMER_CONFIG
    image_tokens = 0
    vision = model / "image_encoder" / "config.json"
    if vision.is_file():
        cfg = json.loads(vision.read_text())
        image_tokens = (cfg["image_size"] // cfg["patch_size"]) ** 2
    return CacheDims(t["text_embed_dim"], t["text_embed_2_dim"], t["image_embed_dim"], image_tokens)


def files_by_part(cache: Path) -> dict[str, int]:
    """Bytes on disk under the cache: entry files by root (text / vae / validation), and every other file."""
    parts = {"text": 0, "vae": 0, "validation": 0, "files": 0}
    for p in cache.rglob("*"):
        if p.is_file():
            part = p.relative_to(cache).parts[0] if p.suffix == ".safetensors" else "files"
            parts[part] += p.stat().st_size
    return parts


@pytest.fixture(scope="module")
def t2v_model(tiny_t2v, tmp_path_factory) -> Path:
    return encodable(tiny_t2v, tmp_path_factory.mktemp("enc"))


@pytest.fixture(scope="module")
def i2v_model(tiny_i2v, tmp_path_factory) -> Path:
    return encodable(tiny_i2v, tmp_path_factory.mktemp("enc"))


def test_the_planned_bucket_is_the_largest_the_cache_build_assigns(tmp_path, t2v_model, monkeypatch):
    import hvtune.plan.dataset as dataset

    probed = []
    monkeypatch.setattr(dataset, "_probe", lambda path, probe=dataset._probe: probed.append(path) or probe(path))
    config = write_project(tmp_path, t2v_model)
    clips = write_clips(tmp_path / "clips")
    (clips / "empty.mp4").write_bytes(b"")  # files a build skips: the plan's scan skips them too
    (clips / "noise.mp4").write_bytes(random.Random(0).randbytes(4096))
    for name in ("empty.txt", "noise.txt"):
        (clips / name).write_text("x")
    resolved = load_config(config, env={})

    shape = shape_for(resolved)
    summary = build_cache(resolved, progress=False)

    built = {s.bucket for s in load_manifest(resolved).samples}
    assert len(built) == 3  # the test's premise: several buckets, of two aspects and two lengths
    assert (shape.width, shape.height, shape.frames) == max(built, key=tokens_of) == (32, 48, 9)
    assert summary.skipped == {"zero_byte": 1, "corrupt": 1}
    assert sorted(probed) == sorted(clips.glob("*.mp4"))  # each file probed once, on the prefetch threads
    assert shape.source == f"the largest bucket of 4 clip(s) in {clips}, 2 file(s) a build would skip"
    assert not (tmp_path / "cache" / "probe_index.json").read_text().count("not hashed")  # plan wrote nothing


@pytest.mark.parametrize(
    ("task", "dtype"),
    [("t2v", "float32"), ("i2v", "float32"), pytest.param("i2v", "bfloat16", marks=pytest.mark.slow)],
    ids=["t2v", "i2v", "i2v-bf16"],
)
def test_the_disk_prediction_matches_a_real_tiny_cache_build(tmp_path, task, dtype, request, monkeypatch):
    """float32 is what this CPU encodes in; bfloat16 is what a GPU box does (mixed_precision bf16): the build is made
    to take the GPU's choice, and its encoders really run in bfloat16."""
    import hvtune.cache.plan

    model = request.getfixturevalue(f"{task}_model")
    config = write_project(tmp_path, model, flavour=f"{task}-480p")
    write_clips(tmp_path / "clips")
    resolved = load_config(config, env={})
    tokens = CaptionTokens(resolved)
    assert tokens.exact  # the tiny model's tokenizer is on this machine: counted, not estimated
    if dtype == "bfloat16":
        assert gpu_cache_dtype(resolved) == dtype
        monkeypatch.setattr(hvtune.cache.plan, "encoder_dtype_name", lambda resolved: "bfloat16")
        # the VAE too: on a GPU it encodes in vae_dtype (SimpleTuner's default bf16); on this CPU it stays float32
        monkeypatch.setattr(hvtune.cache.plan, "vae_encode_dtype_name", lambda resolved: "bfloat16")

    predicted = predict_cache_bytes(resolved, planned_data(resolved).samples, tiny_dims(model), dtype, tokens)
    build_cache(resolved, progress=False)

    actual = files_by_part(tmp_path / "cache")
    # the entries are predicted to the byte; the files beside them (indexes, manifest, probe index) approximately
    assert predicted.parts["text"] == actual["text"]
    assert predicted.parts["latent"] + predicted.parts["siglip"] == actual["vae"]
    assert predicted.parts["validation"] == actual["validation"]
    assert abs(predicted.parts["files"] / actual["files"] - 1) < 0.25
    assert abs(predicted.total / sum(actual.values()) - 1) < 0.05
    assert predicted.entries == {"text": 7, "latent": 4, "siglip": 4 if task == "i2v" else 0}


def test_a_built_cache_gives_the_longest_caption_and_stands_in_for_absent_clips(tmp_path, t2v_model):
    config = write_project(tmp_path, t2v_model)
    clips = write_clips(tmp_path / "clips")
    resolved = load_config(config, env={})
    assert shape_for(resolved).qwen_tokens == CAPTION_TOKENS  # no cache yet: the assumed length
    build_cache(resolved, progress=False)
    tokens = CaptionTokens(resolved)

    shape = shape_for(resolved)

    captions = [c for sample in planned_data(resolved).samples for c in sample.captions]  # as the scan reads them
    assert shape.qwen_tokens == max(tokens(c)[0] for c in captions) > 0
    assert shape.byt5_tokens == tokens(CLIPS[1][3])[1] > 0  # the one quoted text: 'Text "HELLO". ' + end token
    assert "the longest text entry of the cache" in shape.tokens_source
    for f in clips.glob("*.mp4"):  # a training box with the cache and without the clips
        f.unlink()
    unchecked = load_config(config, env={}, check_paths=False)
    data = planned_data(unchecked)
    assert data.origin == "manifest"
    assert data.largest_bucket == (32, 48, 9)
    assert "cache manifest" in shape_for(unchecked, data=data).source
    (clips / "c_tall.txt").write_text("an edited caption")  # the cache no longer matches: neither source counts

    outdated = shape_for(unchecked)

    assert outdated.source.startswith("no clips found at")
    assert outdated.qwen_tokens == CAPTION_TOKENS
    assert "does not match the config: " in outdated.tokens_source and "c_tall.txt" in outdated.tokens_source


@pytest.mark.parametrize("make_folder", [False, True], ids=["missing", "empty"])
def test_without_clips_the_plan_says_so_and_takes_the_usual_aspects(tmp_path, t2v_model, make_folder):
    folder = tmp_path / "not-uploaded-yet"
    if make_folder:
        folder.mkdir()
    config = write_project(tmp_path, t2v_model, data=folder)
    resolved = load_config(config, env={}, check_paths=False)

    shape = shape_for(resolved)

    assert (shape.width, shape.height, shape.frames) == largest_bucket(resolved)
    assert shape.source.startswith(f"no clips found at {folder}: the largest of the usual aspects")
    lines = disk_lines(resolved, planned_data(resolved), shape)
    assert "per clip at" in lines[0] and "per 1,000 clips" in lines[0]
    assert "(cache_dir" in lines[1] and "is not made" in lines[1]  # reports the free space where it will be made


def test_the_seed_project_still_plans(tmp_path):
    resolved = load_config(SEED_CONFIG, env={})
    data = planned_data(resolved)

    shape = shape_for(resolved, data=data)
    lines = disk_lines(resolved, data, shape)

    assert data.origin == "none"
    assert (shape.width, shape.height, shape.frames) == largest_bucket(resolved) == (704, 384, 61)
    assert shape.source.startswith("no clips found at") and shape.source.count("datasets/videos")
    # one full-size clip in bfloat16: latents 32 x 16 x 24 x 44 and a 256-token caption 256 x 3584, 2 bytes each
    per_clip = (32 * 16 * 24 * 44 + 256 * 3584) * 2
    assert f"cache disk (bfloat16): {per_clip / 1e6:.1f} MB per clip at 704x384x61f" in lines[0], lines
    assert f"{per_clip * 1000 / 1e9:.2f} GB per 1,000 clips" in lines[0], lines  # headers and files: < 0.5%
    assert " GB free: " in lines[1] or " MB free: " in lines[1]


def test_hvtune_plan_prints_where_its_bucket_came_from_and_the_disk_before_the_clips_are_uploaded(tmp_path):
    import shutil
    import subprocess
    import sys

    project = tmp_path / "seed"
    shutil.copytree(SEED_CONFIG.parents[1], project)
    shutil.rmtree(project / "datasets", ignore_errors=True)  # planning before renting: no clips anywhere yet
    app = str(Path(__file__).resolve().parents[1] / "app")
    cmd = [sys.executable, "-m", "hvtune", "plan", "--config", "config/config.json", "--validation_disable=true"]
    out = subprocess.run(cmd, cwd=project, capture_output=True, text=True, env={"PYTHONPATH": app}, timeout=600)

    assert out.returncode == 0, out.stderr
    assert f"bucket 704x384x61f: no clips found at {project / 'datasets' / 'videos'}" in out.stdout
    assert "256 caption tokens assumed (no built cache at" in out.stdout
    assert "cache disk (bfloat16): 2.9 MB per clip at 704x384x61f" in out.stdout
    assert "(validation off)" in out.stdout and "VAE decode peak" not in out.stdout


def test_the_glyph_text_is_the_pipelines():
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

    for caption in ["no quotes", 'a sign "OPEN"', 'two "A" and \u201cB\u201d and "A" again', '"', 'empty ""', ""]:
        assert glyph_text(caption) == extract_glyph_texts(caption), caption


def test_a_cache_that_does_not_fit_says_so(tmp_path, t2v_model, monkeypatch):
    import hvtune.plan.disk as disk

    config = write_project(tmp_path, t2v_model)
    write_clips(tmp_path / "clips")
    resolved = load_config(config, env={})
    data = planned_data(resolved)
    monkeypatch.setattr(disk, "free_space", lambda path: (path, 1000))

    lines = disk_lines(resolved, data, shape_for(resolved, data=data))

    assert "for 4 sample(s)" in lines[0] and "counted with the config's tokenizer" in lines[0]
    assert "the cache DOES NOT FIT: " in lines[1]
