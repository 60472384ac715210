"""What the benchmarks share: running hvtune as a user does, the trainer's own step, the pipeline's padding, the
SDPA recorder, tables and the results files.

The benchmarks are scripts, run from the repository root with hvtune on the path:

    PYTHONPATH=app python benchmarks/bench_train.py

Python puts the script's own folder (benchmarks/) first on the path, so they import this module as `common`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from hvtune.model.architectures import IMAGE_TOKENS

BENCHMARKS = Path(__file__).resolve().parent
APP = BENCHMARKS.parent / "app"
RESULTS = BENCHMARKS / "results"

# The HunyuanVideo 1.5 pipeline's text layout (diffusers HunyuanVideo15Pipeline): the Qwen2.5-VL prompt padded to 1000
# tokens after the 108-token template crop, the ByT5 glyph prompt to 256, and 729 SigLIP image tokens that the
# transformer appends for t2v as well (zeros, masked out).
PIPELINE_QWEN_MAX = 1000
PIPELINE_BYT5_MAX = 256
PIPELINE_IMAGE_TOKENS = IMAGE_TOKENS  # SigLIP so400m patch14 at 384: 27 x 27
PIPELINE_TEXT = {"qwen_pad": PIPELINE_QWEN_MAX, "byt5_pad": PIPELINE_BYT5_MAX, "image": PIPELINE_IMAGE_TOKENS}
RESOLUTIONS = {"480p": (61, 480, 848), "720p": (121, 720, 1280)}  # frames, height, width

# the trainer with nothing but training steps: validation off, no checkpoint within the run
NO_SIDE_WORK = ["--validation_disable=true", "--checkpointing_steps=1000000"]


# ------------------------------------------------------------------------------------------- hvtune as a user runs it


def subprocess_env(**defaults: str) -> dict[str, str]:
    """This process's environment with app/ on PYTHONPATH, offline hub, and `defaults` where not set."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(APP), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    for key, value in {"HF_HUB_OFFLINE": "1", **defaults}.items():
        env.setdefault(key, value)
    return env


def hvtune_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "hvtune", *args]


def run(cmd: list[str], timeout: float | None = None) -> tuple[float, subprocess.CompletedProcess]:
    """Run `cmd` to completion; (its wall seconds, the process). A failure raises with the output's tail."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return wall, proc


def loss_rows(out: Path) -> list[dict]:
    """The rows of a run's loss log."""
    from hvtune.run_files import RunFiles

    return [json.loads(line) for line in RunFiles(out).loss_log.read_text().splitlines() if line.strip()]


def trainer_run(config: Path, out: Path, steps: int) -> tuple[list[float], list[float]]:
    """`hvtune.trainer.train` in this process for `steps` steps with nothing but training steps: the step times
    (`seconds` of loss.jsonl) and the losses."""
    from hvtune.config.settings import load_config
    from hvtune.trainer import train

    shutil.rmtree(out, ignore_errors=True)
    resolved = load_config(config, env={}, argv=[*NO_SIDE_WORK, f"--max_train_steps={steps}", f"--output_dir={out}"])
    train(resolved)
    rows = loss_rows(out)
    return [r["seconds"] for r in rows], [r["loss"] for r in rows]


@contextmanager
def step_accelerator(mixed_precision: str, *, cpu: bool) -> Iterator[Any]:
    """The accelerate.Accelerator `training_step` runs under, as the trainer makes it for one process. accelerate
    keeps one process-wide state: it is cleared before and after, so a trainer run in the same process (or the next
    one of these) sets up its own."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield Accelerator(mixed_precision=mixed_precision, cpu=cpu, gradient_accumulation_steps=1)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


# ----------------------------------------------------------------------------------------------- SDPA inspection


class SDPARecorder:
    """Records every F.scaled_dot_product_attention call (mask None / dense, all-True) and the aten op that ran."""

    SDPA_OPS: ClassVar[dict[str, str]] = {
        "aten::_scaled_dot_product_flash_attention": "flash",
        "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU kernel)",
        "aten::_scaled_dot_product_efficient_attention": "efficient",
        "aten::_scaled_dot_product_cudnn_attention": "cudnn",
        "aten::_scaled_dot_product_attention_math": "math",
        "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
    }

    def __init__(self):
        self.calls: list[dict] = []

    def __enter__(self):
        import torch.nn.functional as F

        self._F, self._orig = F, F.scaled_dot_product_attention
        orig = self._orig

        def wrapped(*args, **kwargs):
            q = kwargs.get("query", args[0] if args else None)
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.calls.append(
                {
                    "seq_len": int(q.shape[-2]),
                    "attn_mask": None if mask is None else "dense " + "x".join(str(s) for s in mask.shape),
                    "mask_all_true": None if mask is None else bool(mask.all()),
                }
            )
            return orig(*args, **kwargs)

        F.scaled_dot_product_attention = wrapped
        return self

    def __exit__(self, *exc):
        self._F.scaled_dot_product_attention = self._orig

    @classmethod
    def backends(cls, prof) -> dict[str, int]:
        found = {}
        for e in prof.key_averages():
            if e.key in cls.SDPA_OPS:
                found[cls.SDPA_OPS[e.key]] = found.get(cls.SDPA_OPS[e.key], 0) + e.count
        return found

    def blocks(self, refiner_layers: int) -> dict[str, list[str]]:
        """The masks the dual-stream blocks' attention got (the token refiner's `refiner_layers` calls come first)."""
        blocks = self.calls[refiner_layers:]
        return {
            "block_attn_mask": sorted({c["attn_mask"] or "None" for c in blocks}),
            "block_mask_all_true": sorted({str(c["mask_all_true"]) for c in blocks}),
        }


# ------------------------------------------------------------------------------------------------------- results


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def machine() -> dict[str, Any]:
    """The machine a figure was measured on."""
    return {
        "cpus": os.cpu_count(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def write_result(out: Path, doc: dict) -> None:
    """The benchmark's JSON, written atomically (a reader never sees half of it)."""
    from hvtune.files import write_json_atomic

    write_json_atomic(out, doc, sort_keys=False, default=None)


def write_cache_project(
    root: Path, model: Path, clips: Path, *, cache: Path | None = None, dataset: dict | None = None, **train: Any
) -> Path:
    """A tiny one-dataset project for the cache and training benchmarks: `clips` (9-frame video, resolution 80,
    captions from .txt files unless `dataset` says otherwise) with the text cache default, `model` as t2v-480p,
    the cache in `cache` (default root/cache); `train` adds config keys. Returns root/config.json."""
    clip_dataset = {
        "id": "clips",
        "type": "local",
        "dataset_type": "video",
        "instance_data_dir": str(clips),
        "caption_strategy": "textfile",
        "resolution": 80,
        "video": {"num_frames": 9},
        **(dataset or {}),
    }
    backends = [clip_dataset, {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True}]
    (root / "mdb.json").write_text(json.dumps(backends))
    config = {
        "pretrained_model_name_or_path": str(model),
        "model_flavour": "t2v-480p",
        "cache_dir": str(cache or root / "cache"),
        **train,
        "data_backend_config": str(root / "mdb.json"),
    }
    (root / "config.json").write_text(json.dumps(config))
    return root / "config.json"
