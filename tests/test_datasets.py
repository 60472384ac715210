"""datasets.py on real files: buckets, frame rules, captions, skip reasons, deterministic order and windows."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from clips import write_audio_only, write_clip, write_exif_jpeg
from hvtune.config.schema import VideoOptions
from hvtune.config.settings import DatasetConfig, load_config
from hvtune.data.buckets import BucketRule, bucket_frames, interval_frames, round_to_4n1, simpletuner_bucket
from hvtune.data.datasets import scan
from hvtune.data.issues import DatasetError
from hvtune.data.probe import ProbeIndex


def project(tmp_path: Path, datasets: list[dict], **train) -> object:
    backend = [*datasets, {"id": "text", "dataset_type": "text_embeds", "default": True}]
    (tmp_path / "mdb.json").write_text(json.dumps(backend))
    config = {
        "pretrained_model_name_or_path": str(tmp_path / "model"),
        "cache_dir": str(tmp_path / "cache"),
        "data_backend_config": str(tmp_path / "mdb.json"),
        "aspect_bucket_alignment": 16,  # tiny clips: SimpleTuner's 64 would leave one bucket
        **train,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    return load_config(tmp_path / "config.json", env={})


def video_ds(root: Path, **kw) -> dict:
    return {"id": "clips", "dataset_type": "video", "instance_data_dir": str(root), "resolution": 48,
            "resolution_type": "pixel", "caption_strategy": "textfile", **kw}  # fmt: skip


def caption(path: Path, text: str | bytes = "a grey square") -> Path:
    txt = path.with_suffix(".txt")
    txt.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# --------------------------------------------------------------------------------------------------------- buckets


@pytest.mark.parametrize(
    ("source", "rule", "bucket"),
    [
        ((1920, 1080), BucketRule(0.2304, "area"), (704, 384)),  # pixel_area 480, SimpleTuner's default alignment 64
        ((1080, 1920), BucketRule(0.2304, "area"), (384, 704)),
        ((1920, 1080), BucketRule(0.5184, "area"), (960, 512)),  # pixel_area 720
        ((1920, 1080), BucketRule(480, "pixel"), (832, 512)),
        ((1920, 1080), BucketRule(480, "pixel", 16), (848, 480)),  # Tencent's 480p size
        ((500, 500), BucketRule(0.2304, "area"), (512, 512)),  # square: 0.2304 MP is read as 0.25 -> 512
        ((1920, 1080), BucketRule((320, 320), "fixed"), (320, 320)),  # "WxH": fixed size
    ],
)
def test_buckets_follow_simpletuners_rule(source, rule, bucket):
    assert simpletuner_bucket(*source, rule) == bucket


@pytest.mark.parametrize("alignment", [16, 32, 64])
@pytest.mark.parametrize("aspect", [0.3, 0.5, 0.5625, 0.75, 1.0, 1.33, 1.78, 2.5])
def test_buckets_are_multiples_of_the_alignment(alignment, aspect):
    w, h = simpletuner_bucket(round(2000 * aspect), 2000, BucketRule(0.2304, "area", alignment))
    assert w % alignment == 0 and h % alignment == 0 and w >= alignment and h >= alignment


def test_frame_rules_for_both_strategies():
    assert [round_to_4n1(n) for n in (1, 4, 5, 33, 60, 61)] == [1, 1, 5, 33, 57, 61]
    assert [interval_frames(n, 4) for n in (33, 32, 61, 9)] == [33, 29, 61, 9]
    assert interval_frames(130, 25) == 125 and interval_frames(100, 25) == 73  # 76 -> 4n+1

    def ds(**video):
        return DatasetConfig(id="d", video=VideoOptions(**video))

    assert bucket_frames(100, ds(num_frames=33)) == 33
    with pytest.raises(DatasetError) as e:
        bucket_frames(20, ds(num_frames=33))  # min_frames defaults to num_frames (SimpleTuner)
    assert e.value.reason == "too_few_frames"
    assert bucket_frames(20, ds(num_frames=33, min_frames=9)) == 17  # shorter clip: its own 4n+1 length
    with pytest.raises(DatasetError) as e:
        bucket_frames(100, ds(num_frames=33, max_frames=60))
    assert e.value.reason == "too_many_frames"
    rf = {"bucket_strategy": "resolution_frames", "num_frames": 61, "min_frames": 9}
    assert [bucket_frames(n, ds(**rf)) for n in (9, 17, 20, 45, 200)] == [9, 17, 17, 45, 61]
    assert bucket_frames(60, ds(**rf, frame_interval=8)) == 57  # 59 -> 57 (multiple of 8) -> 57 (4n+1)


def test_both_bucket_strategies_on_real_clips(tmp_path):
    root = tmp_path / "clips"
    root.mkdir()
    for name, frames in (("a", 9), ("b", 13), ("c", 21), ("d", 33)):
        caption(write_clip(root / f"{name}.mp4", frames=frames, size=(64, 48)))
    aspect = scan(project(tmp_path, [video_ds(root, video={"num_frames": 9})]), progress=False)
    assert [s.bucket for s in aspect.samples] == [(64, 48, 9)] * 4
    frames = scan(
        project(
            tmp_path,
            [video_ds(root, video={"num_frames": 29, "min_frames": 9, "bucket_strategy": "resolution_frames"})],
        ),
        progress=False,
    )
    assert [s.bucket for s in frames.samples] == [(64, 48, 9), (64, 48, 13), (64, 48, 21), (64, 48, 29)]
    assert all(0 <= s.start <= 33 - s.frames for s in frames.samples)


# -------------------------------------------------------------------------------------------------------- captions


def test_caption_strategies(tmp_path):
    root = tmp_path / "clips"
    root.mkdir()
    clip = write_clip(root / "red_ball_bouncing.mp4", frames=9)
    caption(clip, b"\xef\xbb\xbffirst caption\n\n  second   caption  \n")  # BOM dropped, blank lines ignored
    sub = root / "sub"
    sub.mkdir()
    write_clip(sub / "other.mp4", frames=9)
    caption(sub / "other.mp4", "nested")

    def captions(**kw):
        result = scan(project(tmp_path, [video_ds(root, video={"num_frames": 9}, **kw)]), progress=False)
        return {s.rel: s.captions for s in result.samples}, {i.source: i.reason for i in result.skipped}

    assert captions()[0] == {"red_ball_bouncing.mp4": ["first caption", "second caption"], "sub/other.mp4": ["nested"]}
    assert captions(caption_strategy="filename")[0]["red_ball_bouncing.mp4"] == ["red ball bouncing"]
    assert captions(caption_strategy="instanceprompt", instance_prompt="sks clip")[0]["sub/other.mp4"] == ["sks clip"]

    (root / "meta.jsonl").write_text(
        json.dumps({"file": "sub/other.mp4", "caption": "from jsonl"}) + "\nnot json\n"
        + json.dumps({"file": "red_ball_bouncing.mp4", "caption": "jsonl two"}) + "\n"
    )  # fmt: skip
    found, skipped = captions(caption_strategy="metadata", metadata_file="meta.jsonl")
    assert found == {"red_ball_bouncing.mp4": ["jsonl two"], "sub/other.mp4": ["from jsonl"]} and not skipped
    (root / "meta.csv").write_text('file,caption\nother.mp4,"from csv, with a comma"\n')
    found, skipped = captions(caption_strategy="metadata", metadata_file="meta.csv")
    assert found == {"sub/other.mp4": ["from csv, with a comma"]}
    assert skipped == {str(clip): "missing_caption"}


def test_bad_captions_are_skipped_with_reasons(tmp_path):
    root = tmp_path / "clips"
    root.mkdir()
    caption(write_clip(root / "good.mp4", frames=9))
    write_clip(root / "missing.mp4", frames=9)
    caption(write_clip(root / "empty.mp4", frames=9), " \n\t\n")
    caption(write_clip(root / "latin1.mp4", frames=9), "un caf\xe9 cr\xe8me".encode("latin-1"))
    result = scan(project(tmp_path, [video_ds(root, video={"num_frames": 9})]), progress=False)
    assert [s.rel for s in result.samples] == ["good.mp4"]
    reasons = {Path(i.source).name: (i.reason, i.detail) for i in result.skipped}
    assert reasons["missing.mp4"][0] == "missing_caption"
    assert reasons["empty.mp4"][0] == "empty_caption"
    assert reasons["latin1.mp4"][0] == "caption_not_utf8" and "byte 6" in reasons["latin1.mp4"][1]


# ----------------------------------------------------------------------------------------------------- bad inputs


def test_every_bad_file_gets_one_report_line_and_the_scan_continues(tmp_path):
    root = tmp_path / "clips"
    root.mkdir()
    caption(write_clip(root / "good.mp4", frames=9))
    caption(root / "zero.mp4").with_suffix(".mp4").write_bytes(b"")
    caption(root / "random.mp4").with_suffix(".mp4").write_bytes(random.Random(0).randbytes(4096))
    caption(write_clip(root / "short.mp4", frames=5))
    caption(write_audio_only(root / "audio.mp4"))
    caption(write_clip(root / "small.mp4", frames=9, size=(32, 24)))
    caption(write_clip(root / "tenbit.mp4", frames=9, pix_fmt="yuv420p10le"))
    caption(write_clip(root / "full444.mp4", frames=9, pix_fmt="yuv444p"))
    caption(write_clip(root / "vfr.mkv", frames=11, pts_ms=[0, 40, 60, 120, 125, 200, 250, 330, 340, 400, 450]))
    caption(write_clip(root / "portrait.mp4", frames=9, rotation_cw=90))
    caption(write_exif_jpeg(root / "phone.jpg", size=(64, 48), orientation=6))
    caption(root / "anim.gif").write_bytes(b"GIF89a")
    (root / ".hidden.mp4").write_bytes(b"")  # hidden files are not samples
    result = scan(project(tmp_path, [video_ds(root, video={"num_frames": 9})]), progress=False)

    skipped = {Path(i.source).name: i.reason for i in result.skipped}
    assert skipped == {
        "zero.mp4": "zero_byte",
        "random.mp4": "corrupt",
        "short.mp4": "too_few_frames",
        "audio.mp4": "audio_only",
        "small.mp4": "too_small",
        "anim.gif": "unsupported_format",
    }
    used = {s.rel: s.bucket for s in result.samples}
    assert used == {
        "full444.mp4": (64, 48, 9),
        "good.mp4": (64, 48, 9),
        "phone.jpg": (48, 64, 1),  # EXIF orientation 6: portrait, one frame
        "portrait.mp4": (48, 64, 9),  # display matrix applied before bucketing
        "tenbit.mp4": (64, 48, 9),
        "vfr.mkv": (64, 48, 9),
    }
    converted = {Path(i.source).name: i.reason for i in result.issues if i.action == "used"}
    assert converted == {
        "full444.mp4": "chroma_converted",
        "phone.jpg": "exif_rotation",
        "portrait.mp4": "rotated",
        "tenbit.mp4": "high_bit_depth",
        "vfr.mkv": "variable_frame_rate",
    }
    assert result.found == {"clips": 12} and result.empty_datasets() == []
    assert all(i.detail for i in result.issues)


def test_image_datasets_repeats_disabled_and_a_dataset_with_nothing_usable(tmp_path):
    imgs, vids, off = tmp_path / "imgs", tmp_path / "vids", tmp_path / "off"
    for d in (imgs, vids, off):
        d.mkdir()
    caption(write_clip(imgs / "clip.mp4", frames=9))
    caption(write_exif_jpeg(imgs / "still.jpg", size=(64, 48), orientation=1))
    caption(write_clip(vids / "only.mp4", frames=9))
    caption(write_clip(off / "x.mp4", frames=9))
    datasets = [
        {"id": "imgs", "dataset_type": "image", "instance_data_dir": str(imgs), "resolution": 48, "repeats": 2},
        {
            "id": "vids",
            "dataset_type": "video",
            "instance_data_dir": str(vids),
            "resolution": 48,
            "caption_strategy": "textfile",
            "video": {"num_frames": 9},
        },
        {"id": "off", "dataset_type": "video", "instance_data_dir": str(off), "disable": True},  # SimpleTuner's name
    ]
    result = scan(project(tmp_path, datasets), progress=False)
    # SimpleTuner's default resolution_type pixel_area: 48 -> 48*48 pixels; at 4:3 and alignment 16 that rounds to
    # a square, which SimpleTuner trains at the 48 edge (TrainingSample.calculate_target_size)
    assert [(s.id, s.bucket, s.repeats) for s in result.samples] == [
        ("imgs/still.jpg", (48, 48, 1), 2),
        ("vids/only.mp4", (48, 48, 9), 0),
    ]
    assert [i.reason for i in result.skipped] == ["video_in_image_dataset"]
    assert result.datasets == ["imgs", "vids"] and result.empty_datasets() == []
    (vids / "only.txt").unlink()
    assert scan(project(tmp_path, datasets), progress=False).empty_datasets() == ["vids"]


# --------------------------------------------------------------------------------------------- order and windows


def test_order_is_sorted_and_windows_follow_seed_and_content_not_names(tmp_path):
    root = tmp_path / "clips"
    root.mkdir()
    for name in ("b", "a", "c"):
        caption(write_clip(root / f"{name}.mp4", frames=33))
    ds = [video_ds(root, video={"num_frames": 9})]
    first = scan(project(tmp_path, ds, seed=1), progress=False)
    assert [s.rel for s in first.samples] == ["a.mp4", "b.mp4", "c.mp4"]
    assert [s.start for s in first.samples] == [
        s.start for s in scan(project(tmp_path, ds, seed=1), progress=False).samples
    ]
    starts = {seed: scan(project(tmp_path, ds, seed=seed), progress=False).samples[0].start for seed in range(6)}
    assert len(set(starts.values())) > 1
    (root / "a.mp4").rename(root / "z.mp4")
    (root / "a.txt").rename(root / "z.txt")
    moved = scan(project(tmp_path, ds, seed=1), progress=False)
    assert moved.samples[-1].rel == "z.mp4" and moved.samples[-1].start == first.samples[0].start


def test_probe_index_skips_rehashing_until_the_file_changes(tmp_path, monkeypatch):
    import hvtune.data.datasets as datasets

    root = tmp_path / "clips"
    root.mkdir()
    caption(write_clip(root / "a.mp4", frames=9))
    resolved = project(tmp_path, [video_ds(root, video={"num_frames": 9})])
    index = ProbeIndex(tmp_path / "probe.json")
    sha = scan(resolved, probe_index=index, progress=False).samples[0].sha256
    index.save()
    calls = []
    monkeypatch.setattr(datasets, "file_sha256", lambda p: calls.append(p) or "x")
    again = ProbeIndex(tmp_path / "probe.json")
    assert scan(resolved, probe_index=again, progress=False).samples[0].sha256 == sha and not calls
    write_clip(root / "a.mp4", frames=13)  # new content: size and mtime change
    assert scan(resolved, probe_index=again, progress=False).samples[0].sha256 == "x" and len(calls) == 1
