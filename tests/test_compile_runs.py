"""Compiled training runs (issue 22): a compiled run resumed from its checkpoint is the uninterrupted compiled run,
bucketed clips of two shapes train, and the number of graphs torch.compile builds is the one docs/PERFORMANCE.md
states. CPU inductor on the tiny model; slow (each compile takes about a minute on this 2-core machine)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from hvtune.cache.build import build_cache
from hvtune.cache.manifest import load_manifest
from hvtune.config.settings import load_config
from hvtune.output.compare import compare_runs
from hvtune.testing.demo import write_demo_project
from hvtune.testing.synth import write_synthetic_dataset
from hvtune.train.batches import load_batch, plan_epoch

# docs/PERFORMANCE.md "Recompiles": with dynamo_dynamic true, regional compilation builds 4 graphs in the first step
# and none after, whatever the bucket shapes and caption lengths: the patch embedder, the token refiner, and the
# dual-stream block twice (the first block's input needs no gradient, the others' do; dynamo guards on requires_grad).
# Measured: TORCH_LOGS=recompiles shows the one requires_grad recompile. (Every batch of this run pads its text; a
# run that mixes padded and unpadded batches adds the dual-stream block's other mask path: 2 more.)
GRAPHS_DYNAMIC_REGIONAL = 4


@pytest.fixture(scope="module")
def two_shapes(tmp_path_factory) -> Path:
    """The demo's 160x96 clips and as many 96x160 ones: two buckets, 8 steps per epoch at batch size 1."""
    root = tmp_path_factory.mktemp("two-shapes")
    config = write_demo_project(root, clips=4, steps=8)
    clips = root / "datasets" / "clips"
    for clip in write_synthetic_dataset(root / "tall", clips=4, seed=1, size=(96, 160), num_frames=17, fps=24):
        for path in (clip, clip.with_suffix(".txt")):
            shutil.move(path, clips / f"tall_{path.name}")
    build_cache(load_config(config, env={}), progress=False)
    return config


def _train(config: Path, out: Path, *extra: str, steps_this_run: int | None = None) -> None:
    from hvtune.trainer import train

    compiled = ["--dynamo_backend=inductor", "--dynamo_use_regional_compilation=1", "--dynamo_dynamic=1"]
    fp32 = ["--mixed_precision=no", "--base_model_precision=no_change", "--validation_disable=1"]
    args = [f"--output_dir={out}", "--max_train_steps=8", "--checkpointing_steps=4", *compiled, *fp32, *extra]
    train(load_config(config, env={}, argv=args), max_steps_this_run=steps_this_run)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_a_resumed_compiled_run_is_the_uninterrupted_one_over_two_bucket_shapes_with_the_documented_graphs(
    two_shapes, tmp_path
):
    manifest = load_manifest(load_config(two_shapes, env={}))
    shapes = {
        tuple(load_batch(manifest, items).latents.shape)
        for items in plan_epoch(manifest, global_batch_size=1, seed=0, epoch=0)
    }
    assert len(shapes) == 2, shapes  # both buckets are trained in the 8 steps

    torch._dynamo.reset()
    counters.clear()
    _train(two_shapes, tmp_path / "full")
    assert dict(counters["graph_break"]) == {}  # no host sync left in the blocks (the padding answer is declared)
    graphs = _graphs()
    assert graphs == GRAPHS_DYNAMIC_REGIONAL, graphs
    seconds = [json.loads(line)["seconds"] for line in (tmp_path / "full/logs/loss.jsonl").read_text().splitlines()]
    assert len(seconds) == 8

    _train(two_shapes, tmp_path / "part", steps_this_run=4)
    assert (tmp_path / "part" / "checkpoints" / "checkpoint-000004").is_dir()
    _train(two_shapes, tmp_path / "part", "--resume_from_checkpoint=latest")
    assert _graphs() == graphs  # nothing recompiles: dynamo's cache (this process) serves the new model's blocks
    comparison = compare_runs(tmp_path / "full", tmp_path / "part")
    assert comparison.verdict == "identical", comparison
