"""Rules across training keys that a field's type cannot say: each named rule below appends a Problem per broken
setting (and a notice where hvtune changes a value), and `check_train_rules` runs them in the order their problems
are listed. `offload_conflicts` is the one home of the offload rules: config refuses what cannot work, training asks
the same function about the device it trains on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hvtune.config.kernels import (
    FP8_PRECISIONS,
    attention_device_problem,
    compile_problem,
    fp8_problem,
    fullgraph_problem,
    mechanism_problem,
)
from hvtune.config.layering import resolve_path
from hvtune.config.schema import LORA_TARGET_PRESETS, DatasetConfig, TrainConfig, parse_wxh
from hvtune.errors import Problem
from hvtune.flavours import DEFAULT_FLAVOUR, FLAVOURS

Where = Callable[[str], str]  # key -> where its value came from (a file, an env var, a flag)


FRAMES_RULE = "(frames - 1) % 4 must be 0, e.g. 1, 33, 61, 121, 129"  # the VAE's 4x causal temporal compression


def frames_ok(n: int | None) -> bool:
    return n is None or (n >= 1 and (n - 1) % 4 == 0)


# The bucket edge a resolution may ask for: below 16 the model has no latent pixel left (the VAE compresses 16x);
# above 4096 (5.7x the 720p flavour's edge) a single frame outgrows any GPU's memory.
MIN_EDGE, MAX_EDGE = 16, 4096


def resolution_problem(resolution: int | float | str, kind: str) -> str | None:
    """Why a dataset's `resolution` of `resolution_type` `kind` (or a fixed "WxH") cannot train, or None: the one
    rule `check`, `cache` and `train` apply at config time, before anything is rounded."""
    span = f"between {MIN_EDGE} and {MAX_EDGE} pixels"
    if isinstance(resolution, str):
        try:
            sides = parse_wxh(resolution)
        except ValueError as e:
            return str(e)
        return None if all(MIN_EDGE <= s <= MAX_EDGE for s in sides) else f"width and height must be {span}"
    if kind == "area":  # megapixels: the bucket's edge is its square root
        if resolution <= 0 or not MIN_EDGE <= (resolution * 1e6) ** 0.5 <= MAX_EDGE:
            low, high = MIN_EDGE**2 / 1e6, MAX_EDGE**2 / 1e6
            return f"resolution_type area takes megapixels: between {low:g} and {high:g} (an edge {span})"
        return None
    if not MIN_EDGE <= resolution <= MAX_EDGE:
        return f"resolution_type {kind} takes the bucket's edge in pixels: {span}"
    return None


def round16(value: int, key: str, notices: list[str]) -> int:
    rounded = value // 16 * 16
    if rounded != value:
        notices.append(f"{key}: {value} rounded down to {rounded} (the model needs multiples of 16)")
    return rounded


def check_train_rules(t: TrainConfig, where: Where, problems: list[Problem], notices: list[str]) -> None:
    check_flavour(t, where, problems)
    validation_frames(t, where, problems, notices)
    normalise_validation_resolution(t, where, problems, notices)
    simpletuner_meanings(t, notices)
    if t.resolution is not None and (rule := resolution_problem(t.resolution, t.resolution_type)):
        problems.append(Problem(where("resolution"), "resolution", t.resolution, rule))
    for key, rule in (*unsupported_values(t), *schedule_problems(t), *offload_conflicts(t)):
        problems.append(Problem(where(key), key, getattr(t, key), rule))


def simpletuner_meanings(t: TrainConfig, notices: list[str]) -> None:
    """Values SimpleTuner reads as another: the schedule its cli_utils.normalize_lr_scheduler_value runs (constant
    with a warmup is constant_with_warmup, cosine_with_warmup is cosine), and null validation prompts (no prompt: no
    validation; no negative prompt: empty)."""
    from hvtune.config.simpletuner import simpletuner_scheduler

    runs = simpletuner_scheduler(t.lr_scheduler, t.lr_warmup_steps)
    if runs != t.lr_scheduler:
        notices.append(
            f"lr_scheduler {t.lr_scheduler} with lr_warmup_steps {t.lr_warmup_steps}: runs as {runs}, as in SimpleTuner"
        )
        t.lr_scheduler = runs
    if t.musubi_blocks_to_swap > 0 and not t.enable_group_offload:
        notices.append(
            f"musubi_blocks_to_swap {t.musubi_blocks_to_swap}: runs as enable_group_offload: true, group_offload_type: "
            "block_level, 1 block per group: every block offloaded, less memory than swapping some, and no slower "
            "with group_offload_use_stream: true on NVIDIA (hvtune plan; docs/SIMPLETUNER.md)"
        )
        t.enable_group_offload, t.group_offload_type, t.group_offload_blocks_per_group = True, "block_level", 1
    if t.validation_negative_prompt is None:
        t.validation_negative_prompt = ""
    if t.validation_prompt is None:
        t.validation_prompt = ""
        if not t.validation_disable:
            notices.append("validation_prompt null: no validation videos, as in SimpleTuner (no prompt to validate)")
            t.validation_disable = True


def validation_frames(t: TrainConfig, where: Where, problems: list[Problem], notices: list[str]) -> None:
    """The diffusers pipeline SimpleTuner validates with renders (n - 1) // 4 * 4 + 1 frames for n: round down to
    that, with a notice (validation only)."""
    key, asked = "validation_num_video_frames", t.validation_num_video_frames
    if asked < 1:
        problems.append(Problem(where(key), key, asked, FRAMES_RULE))
    elif not frames_ok(asked):
        t.validation_num_video_frames = (asked - 1) // 4 * 4 + 1
        notices.append(f"{key} {asked}: renders {t.validation_num_video_frames} ({FRAMES_RULE}), as the pipeline does")


def check_flavour(t: TrainConfig, where: Where, problems: list[Problem]) -> None:
    """A flavour hvtune does not know is listed with the other problems; the rest of the rules then judge the
    default flavour's settings."""
    if t.model_flavour not in FLAVOURS:
        rule = f"must be one of {', '.join(FLAVOURS)}"
        problems.append(Problem(where("model_flavour"), "model_flavour", t.model_flavour, rule))
        t.model_flavour = DEFAULT_FLAVOUR


def normalise_validation_resolution(t: TrainConfig, where: Where, problems: list[Problem], notices: list[str]) -> None:
    """SimpleTuner's forms to one WxH: a comma list or a list validates at its first entry, an int N is NxN, and
    each side is rounded down to a multiple of 16."""
    value = t.validation_resolution
    if isinstance(value, list) or (isinstance(value, str) and "," in value):
        entries = value if isinstance(value, list) else [e.strip() for e in value.split(",")]
        if len(entries) > 1:
            notices.append(f"validation_resolution: validating at {entries[0]} only (of {entries})")
        t.validation_resolution = entries[0] if entries else None
    value = t.validation_resolution
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        t.validation_resolution = f"{int(value)}x{int(value)}"
    if t.validation_resolution is None:
        return
    try:
        w, h = parse_wxh(t.validation_resolution)
        w, h = round16(w, "validation_resolution width", notices), round16(h, "validation_resolution height", notices)
        if min(w, h) < 16:
            raise ValueError("width and height must be at least 16")
        t.validation_resolution = f"{w}x{h}"
    except ValueError as e:
        problems.append(
            Problem(where("validation_resolution"), "validation_resolution", t.validation_resolution, str(e))
        )


def unsupported_values(t: TrainConfig) -> list[tuple[str, str]]:
    """(key, why) for values SimpleTuner accepts and hvtune cannot train as asked."""
    found = []
    if t.base_model_precision not in ("no_change", "bf16", "int8-torchao", *FP8_PRECISIONS):
        rule = "hvtune quantises with torchao int8 only: use int8-torchao (nearest), bf16 or no_change"
        found.append(("base_model_precision", rule))
    if rule := mechanism_problem(t.attention_mechanism, t.sageattention_usage):
        found.append(("attention_mechanism", rule))
    if rule := compile_problem(t.dynamo_backend):
        found.append(("dynamo_backend", rule))
    if rule := fullgraph_problem(t.dynamo_backend, t.dynamo_fullgraph, t.enable_group_offload):
        found.append(("dynamo_fullgraph", rule))
    found += fsdp_conflicts(t)
    found += context_parallel_problems(t)
    if t.validation_prompt_library:
        rule = "SimpleTuner's built-in prompt library is not available: validation uses validation_prompt; set false"
        found.append(("validation_prompt_library", rule))
    if not t.train_steps_limit and t.num_train_epochs == 0:
        found.append(("num_train_epochs", "0 means 'use max_train_steps': set one of them"))
    if isinstance(t.lora_target_modules, str) and t.lora_target_modules not in LORA_TARGET_PRESETS:
        rule = f'a preset ({", ".join(LORA_TARGET_PRESETS)}) or a list of module names such as ["to_q", "to_k"]'
        found.append(("lora_target_modules", rule))
    if t.aspect_bucket_alignment % 16:
        found.append(("aspect_bucket_alignment", "HunyuanVideo 1.5 needs multiples of 16: use 16, 32 or 64"))
    return found


def context_parallel_problems(t: TrainConfig, world: int | None = None) -> list[tuple[str, str]]:
    """(key, why) for context parallelism (hvtune.train.context_parallel) as the launch can run it. `world`: the
    processes launched (WORLD_SIZE from torchrun/accelerate, else the containers' NUM_PROCESSES), when known."""
    import os

    cp, strategy = t.context_parallel_size, t.context_parallel_comm_strategy
    if strategy not in ("allgather", "alltoall"):
        return [("context_parallel_comm_strategy", "allgather (ring attention) or alltoall (Ulysses), as SimpleTuner")]
    if cp == 1:
        return []
    world = world or int(os.environ.get("WORLD_SIZE") or os.environ.get("NUM_PROCESSES") or 0) or None
    if world is not None and world % cp:
        why = f"{cp} does not divide the {world} processes launched: launch a multiple of {cp} or change it"
        return [("context_parallel_size", why)]
    if t.fsdp_enable:
        return [("context_parallel_size", "context parallelism with FSDP is not built yet: fsdp_enable false")]
    if strategy == "allgather":  # hvtune.train.context_parallel says why
        why = "diffusers' ring attention cannot train HunyuanVideo 1.5 (see docs/PERFORMANCE.md): use alltoall"
        return [("context_parallel_comm_strategy", why)]
    return []


def fsdp_conflicts(t: TrainConfig) -> list[tuple[str, str]]:
    """(key, why) for settings FSDP2 (train/sharding.py) does not train with: refused at check, not at step 1."""
    if not t.fsdp_enable:
        return []
    found = []
    if t.fsdp_version != 2:
        found.append(("fsdp_version", "hvtune shards with FSDP2 only: set 2"))
    if t.base_model_precision in ("int8-torchao", *FP8_PRECISIONS):
        rule = (
            "FSDP2 cannot shard torchao's quantised weights (int8: aten.split missing): use bf16, or fsdp_enable false"
        )
        found.append(("base_model_precision", rule))
    if t.enable_group_offload:
        found.append(("enable_group_offload", "not with fsdp_enable (FSDP2 already splits the base): choose one"))
    if t.lora_type == "lycoris":
        found.append(("lora_type", "LyCORIS with fsdp_enable is not supported: use lora_type standard"))
    if t.dynamo_backend not in ("no", None):
        found.append(("dynamo_backend", "torch.compile with fsdp_enable is not supported yet: set no"))
    return found


def schedule_problems(t: TrainConfig) -> list[tuple[str, str]]:
    """(key, why) for an optimizer or lr_scheduler name hvtune does not have, as simpletuner's tables say."""
    from hvtune.config.simpletuner import optimizer_problem, scheduler_problem

    found = [
        ("optimizer", optimizer_problem(t.optimizer)),
        ("lr_scheduler", scheduler_problem(t.lr_scheduler, t.lr_warmup_steps)),
    ]
    return [(key, rule) for key, rule in found if rule]


def offload_conflicts(t: TrainConfig, device: str | None = None) -> list[tuple[str, str]]:
    """(key, why) for each offload setting that cannot work: the one rule config checks and training obeys.

    Without `device`, the settings among themselves; with it ("cuda", "rocm" or "cpu" as
    `model.registry.detect_device` says, or a torch device type), also what that device cannot do."""
    found = []
    if t.group_offload_use_stream and t.enable_model_cpu_offload:
        found.append(
            ("group_offload_use_stream", "never combine with enable_model_cpu_offload; choose one offload method")
        )
    if t.group_offload_use_stream and not t.enable_group_offload:
        rule = "only applies with enable_group_offload: true; enable group offload or drop the flag"
        found.append(("group_offload_use_stream", rule))
    if t.enable_group_offload and t.enable_model_cpu_offload:
        found.append(("enable_model_cpu_offload", "never combine with enable_group_offload; choose one offload method"))
    if device is not None and t.group_offload_use_stream and device != "cuda":
        rule = f"needs an NVIDIA CUDA GPU (this machine: {device}); set it to false"
        found.append(("group_offload_use_stream", rule))
    return found


def check_device_support(t: TrainConfig, device: str, where: str = "config") -> list[Problem]:
    """Rules that depend on the machine: `device` is "cuda", "rocm" or "cpu" (see registry.detect_device). A config
    `load_config` accepted breaks only the device's part of `offload_conflicts`."""
    found = offload_conflicts(t, device)
    if rule := attention_device_problem(t.attention_mechanism, t.sageattention_usage, device):
        found.append(("attention_mechanism", rule))
    if rule := fp8_problem(t.base_model_precision, device):
        found.append(("base_model_precision", rule))
    return [Problem(where, key, getattr(t, key), rule) for key, rule in found]


# ---------------------------------------------------------------------------------------------- SimpleTuner features


def check_added_features(
    t: TrainConfig, datasets: list[DatasetConfig], where: Where, problems: list[Problem], config_path: Path | None
) -> None:
    """lora_type lycoris needs a readable lycoris_config (resolved like data paths); RamTorch is refused with the
    setting that does the same job here (musubi_blocks_to_swap runs as group offload: `simpletuner_meanings`);
    validation_using_datasets needs i2v and known eval_dataset_id."""
    if t.lora_type == "lycoris":
        check_lycoris_config(t, where, problems, config_path)
    if t.ramtorch:
        rule = "RamTorch is not included; use enable_group_offload: true with group_offload_type: leaf_level"
        problems.append(Problem(where("ramtorch"), "ramtorch", True, rule))
    if t.validation_using_datasets and t.model_flavour in FLAVOURS and not t.flavour.image_condition:
        rule = "needs an i2v model_flavour (HunyuanVideo 1.5 t2v has no image input to take from the dataset)"
        problems.append(Problem(where("validation_using_datasets"), "validation_using_datasets", True, rule))
    wanted = [t.eval_dataset_id] if isinstance(t.eval_dataset_id, str) else t.eval_dataset_id or []
    known = [d.id for d in datasets if d.dataset_type in ("video", "image") and not d.disabled]
    unknown = [i for i in wanted if i not in known]
    if unknown and datasets:
        rule = f"no enabled video or image dataset with that id (known: {', '.join(known)})"
        problems.append(Problem(where("eval_dataset_id"), "eval_dataset_id", unknown, rule))


def check_lycoris_config(t: TrainConfig, where: Where, problems: list[Problem], config_path: Path | None) -> None:
    """The LyCORIS JSON exists and hvtune can train what it asks for; its resolved path replaces the setting."""
    from hvtune.config.lycoris import read_lycoris_config

    text = t.lycoris_config or "config/lycoris_config.json"  # SimpleTuner's default
    path = resolve_path(text, config_path)
    try:
        if not path.is_file():
            raise ValueError(
                f"file not found (looked for {path.absolute()}); lora_type lycoris needs a LyCORIS JSON such as "
                "SimpleTuner's examples/lycoris_config.json"
            )
        read_lycoris_config(path)
        t.lycoris_config = str(path)
    except ValueError as e:
        problems.append(Problem(where("lycoris_config"), "lycoris_config", text, str(e)))
