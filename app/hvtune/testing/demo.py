"""`hvtune demo`: the whole appliance on a tiny random model and synthetic clips, on any machine, in minutes.

It writes an ordinary project folder (config.json, multidatabackend.json, clips, model) and then runs exactly what a
user runs: `cache`, then `train`, through the same stages and the same loading code as the real model.
"""

from __future__ import annotations

import json
from pathlib import Path

from hvtune.files import write_text_atomic

DEMO_STEPS = 40


def write_demo_project(
    root: Path, *, task: str = "t2v", clips: int = 8, seed: int = 0, steps: int = DEMO_STEPS
) -> Path:
    """Create the demo project under `root`; returns the config path. Existing model and clips are reused."""
    from hvtune.testing.synth import write_synthetic_dataset
    from hvtune.testing.tiny_model import write_tiny_model

    root.mkdir(parents=True, exist_ok=True)
    model = root / f"tiny-{task}-model"
    if not (model / "model_index.json").exists():
        write_tiny_model(model, task=task, seed=seed)
    clips_dir = root / "datasets" / "clips"
    if not clips_dir.is_dir() or len(list(clips_dir.glob("*.mp4"))) < clips:
        write_synthetic_dataset(clips_dir, clips=clips, seed=seed, size=(160, 96), num_frames=17, fps=24)
    (root / "config").mkdir(exist_ok=True)
    backends = _demo_backends(root, clips_dir)
    config = _demo_config(root, model, task=task, seed=seed, steps=steps)
    for name, data in (("multidatabackend.json", backends), ("config.json", config)):
        write_text_atomic(root / "config" / name, json.dumps(data, indent=2) + "\n")
    return root / "config" / "config.json"


def _demo_backends(root: Path, clips_dir: Path) -> list[dict]:
    """multidatabackend.json: the synthetic clips, and the text embeds' cache."""
    return [
        {
            "id": "synthetic-clips",
            "type": "local",
            "dataset_type": "video",
            "instance_data_dir": str(clips_dir),
            "caption_strategy": "textfile",
            "resolution": 96,
            "resolution_type": "pixel",  # short edge 96: the 160x96 clips train at 160x96
            "video": {"num_frames": 9, "min_frames": 9, "bucket_strategy": "aspect_ratio"},
            "repeats": 0,
        },
        {
            "id": "text-embeds",
            "type": "local",
            "dataset_type": "text_embeds",
            "default": True,
            "cache_dir": str(root / "cache" / "text"),
        },
    ]


def _demo_config(root: Path, model: Path, *, task: str, seed: int, steps: int) -> dict:
    """config.json: SimpleTuner's keys, sized so the whole run takes minutes on a CPU."""
    return {
        "model_type": "lora",
        "model_family": "hunyuanvideo",
        "pretrained_model_name_or_path": str(model),
        "model_flavour": f"{task}-480p",
        "output_dir": str(root / "output"),
        "cache_dir": str(root / "cache"),
        "dataset_backend_config": str(root / "config" / "multidatabackend.json"),
        "aspect_bucket_alignment": 16,  # SimpleTuner's 64 is coarse for 96-pixel clips
        "validation_resolution": "160x96",
        "validation_num_video_frames": 9,
        "validation_num_inference_steps": 4,
        "validation_prompt": 'a red circle moving right on a sign that reads "HV"',
        "validation_guidance": 4.0,
        "validation_steps": steps // 2,
        "train_batch_size": 2,
        "learning_rate": 1e-3,
        "lr_scheduler": "constant",
        "max_train_steps": steps,
        "checkpointing_steps": steps // 2,
        "checkpoints_total_limit": 2,
        "mixed_precision": "no",
        "base_model_precision": "no_change",
        "optimizer": "torch-adamw",  # SimpleTuner's name; same settings as hvtune's earlier "adamw"
        "lora_rank": 8,
        "seed": seed or 42,  # SimpleTuner reads seed 0 as "a new seed from the clock": the demo must repeat
    }
