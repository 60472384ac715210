"""What `hvtune train` refuses before its first step, decided once: `train` calls each decision where it needs the
answer, and `hvtune check` calls them all up front (`preflight_problems`), so that check refuses all train would.

train's refusals before step 1, in its order, and the one function that decides each:

- the config itself: `config.settings.load_config` (both commands load it the same way)
- the device's support for the config: `config.rules.check_device_support` (check calls it first)
- another `hvtune train` in output_dir: `output.run_dir.output_dir_in_use` (train: `output_dir_lock`)
- output_dir / cache_dir not usable: `files.writable_dir_problem` (train: `output.run_dir.check_output_dir`)
- the cache missing, stale, damaged, or its datasets changed: `cache.manifest.load_manifest`; check asks only once a
  cache exists (its fix, `hvtune cache`, is the next command anyway)
- no full batch of train_batch_size in any bucket: `no_full_batch` (check: the cache's samples, else the clips')
- output_dir holding another run: `output.checkpoints.plan_start` (check: once a cache exists)
- the model folders: `model.registry` (`local_source_problems` / `resolve_model`; every weight shard listed in an
  index, whole: `model.component_files.missing_files`)
- LoRA targets matching no layer or without a ComfyUI name: `add_lora_checked` (check: on the transformer built on
  the meta device, no weights read)
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hvtune.config.settings import ResolvedConfig
from hvtune.errors import UserError
from hvtune.output.comfyui import to_comfyui
from hvtune.output.export import adapter_scales, lora_state_dict
from hvtune.train.batches import plan_epoch
from hvtune.train.context_parallel import bucket_split_problem
from hvtune.train.lora import add_lora, lora_alpha
from hvtune.train.step import TrainError


def no_full_batch(samples_of: Any, train_batch_size: int, world: int, seed: int) -> str | None:
    """Why no optimizer step can run: no bucket of `samples_of.samples` (a cache's manifest or a scan of the clips)
    holds a full global batch of train_batch_size x processes. None when some does."""
    global_batch = train_batch_size * world
    if plan_epoch(samples_of, global_batch_size=global_batch, seed=seed, epoch=0):
        return None
    sizes: dict[tuple, int] = {}
    for s in samples_of.samples:
        sizes[tuple(s.bucket)] = sizes.get(tuple(s.bucket), 0) + s.repeats + 1
    largest = max(sizes.values(), default=0)
    return (
        f"train_batch_size {train_batch_size}: no full batch of {global_batch} samples in any bucket "
        f"({len(samples_of.samples)} samples; the largest bucket holds {largest} per epoch): "
        "lower train_batch_size or add clips"
    )


def total_steps(cfg, samples_of: Any, world: int) -> int:
    """The run's optimizer steps (max_train_steps, else num_train_epochs of full batches); TrainError with
    `no_full_batch`'s line when no step can run."""
    problem = no_full_batch(samples_of, cfg.train_batch_size, world, cfg.seed)
    if problem:
        raise TrainError(problem)
    global_batch = cfg.train_batch_size * world
    batches_per_epoch = len(plan_epoch(samples_of, global_batch_size=global_batch, seed=cfg.seed, epoch=0))
    steps_per_epoch = max(1, batches_per_epoch // cfg.gradient_accumulation_steps)
    return cfg.train_steps_limit or cfg.num_train_epochs * steps_per_epoch


def add_lora_checked(transformer, cfg) -> None:
    """The LoRA on `transformer` as training adds it, refused (TrainError) when its targets match no layer or have no
    ComfyUI name: now, not when the run exports after hours."""
    try:
        add_lora(transformer, cfg)
    except UserError as e:
        raise TrainError(str(e)) from e
    import torch
    from peft.utils import get_peft_model_state_dict

    on_meta = any(p.is_meta for p in transformer.parameters() if p.requires_grad)  # check: names and shapes only
    model = getattr(transformer, "module", transformer)
    weights = get_peft_model_state_dict(model) if on_meta else lora_state_dict(transformer)
    try:
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            to_comfyui(weights, float(lora_alpha(cfg)), adapter_scales(transformer))
    except ValueError as e:
        raise TrainError(f"lora_target_modules: {e}; the ComfyUI export could not be written") from e


def preflight_problems(resolved: ResolvedConfig, notices: list[str] | None = None) -> list[str]:
    """Everything train would refuse before step 1 (after the device check), each as its one line, all at once.
    What is not known yet (no usable clip in a dataset's folder: not uploaded yet?) goes to `notices`."""
    from hvtune.files import writable_dir_problem
    from hvtune.model.registry import local_source_problems
    from hvtune.output.run_dir import output_dir_in_use

    cfg = resolved.train
    model_problems = local_source_problems(cfg)
    problems = list(model_problems)
    for key in ("output_dir", "cache_dir"):
        problem = writable_dir_problem(getattr(cfg, key))
        if problem:
            problems.append(f"{key}: {problem}")
    in_use = output_dir_in_use(Path(cfg.output_dir))
    problems += [in_use] if in_use else []
    missing_data = _missing_data_dirs(resolved)
    problems += missing_data
    if not missing_data:
        problems += _cache_problems(resolved, [] if notices is None else notices)
    if not model_problems:  # the LoRA is built on the transformer's own config
        problems += _lora_problems(resolved)
    return problems


def _missing_data_dirs(resolved: ResolvedConfig) -> list[str]:
    from hvtune.data.datasets import media_datasets

    return [
        f"dataset {ds.id}: instance_data_dir {ds.instance_data_dir} is not a folder"
        for ds in media_datasets(resolved)
        if not Path(ds.instance_data_dir or "").expanduser().is_dir()
    ]


def _cache_problems(resolved: ResolvedConfig, notices: list[str]) -> list[str]:
    """The cache's refusal (once one exists), the batch rule on its samples (else the clips'), the output_dir's."""
    from hvtune.cache.layout import CacheLayout
    from hvtune.cache.manifest import load_manifest
    from hvtune.output.checkpoints import plan_start, run_identity

    cfg, layout = resolved.train, CacheLayout(resolved)
    world = max(1, int(os.environ.get("WORLD_SIZE", "1")) // cfg.context_parallel_size)  # the data-parallel ranks
    manifest, problems = None, []
    if layout.manifest_path.is_file():
        try:
            manifest = load_manifest(resolved)
        except UserError as e:
            problems.append(str(e))
    samples_of = manifest if manifest is not None else _scanned(resolved, layout)
    if not samples_of.samples:  # `hvtune cache` refuses a dataset without a usable clip, naming each file's reason
        notices.append("no usable clip in the datasets yet: the batch size is checked once there are clips")
        return problems
    batch = no_full_batch(samples_of, cfg.train_batch_size, world, cfg.seed)
    if batch:
        return [*problems, batch]
    if manifest is not None and (split := bucket_split_problem(cfg.context_parallel_size, manifest)):
        problems.append(split)
    if manifest is not None:
        identity = run_identity(cfg.model_dump(), manifest.samples_hash)
        try:
            plan_start(
                Path(cfg.output_dir), cfg.resume_from_checkpoint, identity, total_steps(cfg, manifest, world),
                overwrite=cfg.overwrite_output_dir,
            )  # fmt: skip
        except UserError as e:
            problems.append(str(e))
    return problems


def _scanned(resolved: ResolvedConfig, layout):
    """The clips' samples as `hvtune cache` will scan them; the probe index is saved, so that cache does not probe
    them again."""
    from hvtune.data.datasets import ProbeIndex, scan

    probe = ProbeIndex(layout.probe_index_path)
    result = scan(resolved, probe_index=probe, progress=False)
    if layout.root.is_dir():  # kept for `hvtune cache` where its cache is; check creates no folder
        with contextlib.suppress(OSError):
            probe.save()
    # as the manifest will list them: numbered in scan order
    samples = [SimpleNamespace(index=i, bucket=s.bucket, repeats=s.repeats) for i, s in enumerate(result.samples)]
    return SimpleNamespace(samples=samples)


def _lora_problems(resolved: ResolvedConfig) -> list[str]:
    """`add_lora_checked` on the transformer built on the meta device from its config (the local folder's, else the
    flavour's full-size one): no weights are read."""
    cfg = resolved.train
    if cfg.lora_target_modules is None and cfg.lora_type == "standard":
        return []  # the default targets map (every demo run exports them): no need to import diffusers here
    import json

    import torch
    from diffusers import HunyuanVideo15Transformer3DModel

    from hvtune.model.architectures import transformer_config
    from hvtune.model.registry import plan_sources

    source = plan_sources(cfg).get("transformer")
    config = transformer_config(cfg.model_flavour)
    if source is not None and source.is_local:
        local = Path(source.location).expanduser() / "transformer" / "config.json"
        if local.is_file():
            config = {k: v for k, v in json.loads(local.read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        transformer = HunyuanVideo15Transformer3DModel.from_config(config)
    try:
        add_lora_checked(transformer, cfg)
    except UserError as e:
        return [str(e)]
    except (NotImplementedError, RuntimeError):  # an adapter that cannot be built without weights: train decides
        return []
    return []
