"""Issue 13: failures that used to pass without a word (mixed runs, lying caches, ignored clips, cut captions) and
errors a user can act on. Each test reproduces the case on real clips and the tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

from clips import write_clip
from hvtune.config import load_config
from hvtune.datasets import scan


def _project(tmp_path: Path, root: Path, **train) -> object:
    backend = [
        {
            "id": "clips",
            "dataset_type": "video",
            "instance_data_dir": str(root),
            "resolution": 48,
            "video": {"num_frames": 9},
        },
        {"id": "text", "dataset_type": "text_embeds", "default": True},
    ]
    (tmp_path / "mdb.json").write_text(json.dumps(backend))
    config = {"cache_dir": str(tmp_path / "cache"), "data_backend_config": str(tmp_path / "mdb.json"), **train}
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
    result = scan(_project(tmp_path, root), progress=False)
    assert sorted(s.rel for s in result.samples) == ["a.mp4", "again/b0.mp4", "again/b1.mp4", "again/b2.mp4"]
    repeated = sorted(Path(i.source).relative_to(root).as_posix() for i in result.skipped)
    assert repeated == ["again/back", "linked"]
    assert {i.reason for i in result.skipped} == {"folder_seen_twice"}


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
