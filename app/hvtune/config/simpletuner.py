"""What each SimpleTuner 4.10.1 option means in hvtune: the one table `hvtune check`, the config loader and
docs/SIMPLETUNER.md (generated from it, tests/test_simpletuner.py keeps them equal) read.

Every key of a config.json is one of:
- `same`: hvtune does what SimpleTuner does with it (the note says how, and cites SimpleTuner's code).
- `ignored`: it has no effect on the trained LoRA (logging, hub upload, speed knobs hvtune sets itself): a notice.
- `refused`: SimpleTuner changes training with it and hvtune does not do that: an error naming the key and what to do,
  unless the value is SimpleTuner's own default (then it asks for nothing) or the user sets
  `allow_unsupported_keys: true` (then it is a notice saying the result will differ from SimpleTuner's).
Keys SimpleTuner does not know either (typos, other trainers' keys) are reported as unknown.

SimpleTuner's defaults come from `simpletuner_options.json`, generated from the wheel's field registry by
benchmarks/simpletuner_options.py. Paths below are inside the wheel `simpletuner-4.10.1-py3-none-any.whl`.
"""

from __future__ import annotations

import json
from contextlib import suppress
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

VERSION = "4.10.1"
REGISTRY = "simpletuner_sdk/server/services/field_registry/sections"
TRAINER = "helpers/training/trainer.py"
CMD_ARGS = "helpers/configuration/cmd_args.py"
FACTORY = "helpers/data_backend/factory.py"
IMAGE = "helpers/multiaspect/image.py"
SAMPLE = "helpers/image_manipulation/training_sample.py"
OPTIMIZERS = "helpers/training/optimizer_param.py"
SCHEDULERS = "helpers/training/custom_schedule.py"
HUNYUAN = "helpers/models/hunyuanvideo/model.py"
CLI_UTILS = "helpers/configuration/cli_utils.py"


@dataclass(frozen=True)
class KeyPolicy:
    status: str  # "same" | "ignored" | "refused"
    note: str
    source: str = ""


def _same(note: str, source: str = "") -> KeyPolicy:
    return KeyPolicy("same", note, source)


def _ignored(note: str, source: str = "") -> KeyPolicy:
    return KeyPolicy("ignored", note, source)


def _refused(note: str, source: str = "") -> KeyPolicy:
    return KeyPolicy("refused", note, source)


_LOGGING = "logging/tracking only; no effect on the LoRA"
_HUB = "hvtune never uploads; no effect on the LoRA"
_SPEED = "a speed or memory knob hvtune decides itself; no effect on the LoRA"

# Training keys (config.json). hvtune's own extensions are marked "hvtune:".
TRAIN_KEYS: dict[str, KeyPolicy] = {
    # model
    "model_type": _same("lora only (full fine-tuning is refused by the value check)"),
    "model_family": _same("hunyuanvideo only"),
    "model_flavour": _same("t2v-480p, t2v-720p, i2v-480p, i2v-720p", HUNYUAN),
    "pretrained_model_name_or_path": _same("hub id or local folder"),
    "revision": _same("hub revision"),
    "base_model_precision": _same(
        "no_change (SimpleTuner's default) keeps the base in the mixed_precision dtype (bf16), 'no' in fp32; "
        "bf16; int8-torchao (weight-only int8). Other quantisations are refused with int8-torchao as the nearest",
        CMD_ARGS + " (model_is_bf16)",
    ),
    "data_backend_config": _same("path to multidatabackend.json; hvtune also accepts dataset_backend_config"),
    "output_dir": _same("where checkpoints, the LoRA and run.json go"),
    "cache_dir": _same("cache root"),
    "seed": _same(
        "0 = a seed from the clock, -1 = a random seed (SimpleTuner's meaning; the drawn seed is printed and "
        "recorded in run.json). Omitted: hvtune uses 42 on purpose (SimpleTuner leaves it unseeded)",
        CMD_ARGS,
    ),
    "resolution": _same("dataset default resolution, see resolution_type", FACTORY),
    "resolution_type": _same(
        "pixel (short edge), area (megapixels), pixel_area (edge -> area); default pixel_area", IMAGE
    ),
    "aspect_bucket_alignment": _same(
        "bucket sides are multiples of it (default 64); hvtune needs a multiple of 16", IMAGE
    ),
    "aspect_bucket_rounding": _same("decimals of the aspect ratio used for buckets (default 2)", IMAGE),
    "minimum_image_size": _same(
        "skip sources below it (pixel edge, or area for area/pixel_area); 0/None: none",
        "helpers/metadata/backends/base.py",
    ),
    "maximum_image_size": _same(
        "no effect without crop, as in SimpleTuner; with crop see target_downsample_size", SAMPLE
    ),
    "target_downsample_size": _same(
        "no effect without crop, as in SimpleTuner; with crop and maximum_image_size refused (downsample-then-crop "
        "is not implemented)",
        SAMPLE,
    ),
    # LoRA
    "lora_rank": _same("LoRA rank"),
    "lora_alpha": _same("LoRA alpha (default: the rank)"),
    "lora_dropout": _same("LoRA dropout; omitted: 0.0 on purpose (SimpleTuner 0.1), see the defaults table"),
    "lora_init_type": _same("default or gaussian"),
    # optimisation
    "train_batch_size": _same("per-device batch"),
    "gradient_accumulation_steps": _same("micro-batches per optimizer step"),
    "learning_rate": _same("peak learning rate"),
    "lr_scheduler": _same(
        "constant, constant_with_warmup, linear, polynomial (diffusers' schedules, as SimpleTuner); cosine, "
        "cosine_with_restarts, sine as SimpleTuner's own classes compute them: period lr_warmup_steps, no warmup, "
        "floor to lr_end; cosine_with_restarts stays at learning_rate (its steps_per_epoch=-1 keeps T_cur at 0)",
        SCHEDULERS,
    ),
    "lr_warmup_steps": _same("linear warmup steps"),
    "lr_num_cycles": _ignored("SimpleTuner passes it to diffusers' schedules, none of which uses it for its names"),
    "lr_power": _same("power of polynomial"),
    "lr_end": _same("final lr of polynomial"),
    "max_train_steps": _same("0 or absent: use num_train_epochs", CMD_ARGS),
    "num_train_epochs": _same("0: use max_train_steps", CMD_ARGS),
    "optimizer": _same("SimpleTuner's names, mapped in memory.OPTIMIZERS (see docs/SIMPLETUNER.md)", OPTIMIZERS),
    "optimizer_config": _same("comma list key=value passed to the optimizer, as SimpleTuner does", OPTIMIZERS),
    "optimizer_beta1": _same("overrides the optimizer's beta1 (with optimizer_beta2)", OPTIMIZERS),
    "optimizer_beta2": _same("overrides the optimizer's beta2 (with optimizer_beta1)", OPTIMIZERS),
    "adam_beta1": _ignored("SimpleTuner passes it only to DeepSpeed's optimizer; use optimizer_beta1", OPTIMIZERS),
    "adam_beta2": _ignored("SimpleTuner passes it only to DeepSpeed's optimizer; use optimizer_beta2", OPTIMIZERS),
    "adam_epsilon": _ignored(
        "SimpleTuner passes it only to DeepSpeed's optimizer; use optimizer_config eps=", OPTIMIZERS
    ),
    "adam_weight_decay": _ignored(
        "SimpleTuner passes it only to DeepSpeed's optimizer; use optimizer_config weight_decay=", OPTIMIZERS
    ),
    "max_grad_norm": _same("clip threshold; 0 disables; not applied for optimi-stableadamw/prodigy", TRAINER),
    "grad_clip_method": _same("value (default: clamp each gradient element) or norm", TRAINER),
    "mixed_precision": _same("bf16 or no"),
    "caption_dropout_probability": _same("probability of training on the empty prompt"),
    "flow_schedule_shift": _same("timestep shift; default 3.0 as SimpleTuner; 0 = no shift", REGISTRY + "/advanced.py"),
    "flow_use_uniform_schedule": _same("timesteps from U(0,1) instead of sigmoid(N(0,1))"),
    "flow_sigmoid_scale": _same("sigmoid(scale * N(0,1))"),
    "flow_schedule_auto_shift": _same(
        "with flow_schedule_shift 0: shift = exp(flux calculate_shift(frames*(H/2)*(W/2) latents)) per batch, with "
        "the scheduler's config (SimpleTuner's patch_size fallback 2)",
        "helpers/training/custom_schedule.py",
    ),
    "flow_use_beta_schedule": _same("timesteps from Beta(flow_beta_schedule_alpha, _beta)", "helpers/models/common.py"),
    "flow_beta_schedule_alpha": _same("alpha of the beta schedule (default 2.0)"),
    "flow_beta_schedule_beta": _same("beta of the beta schedule (default 2.0)"),
    "gradient_checkpointing": _same("activation checkpointing of the transformer blocks"),
    "vae_enable_tiling": _same("VAE tiling"),
    "vae_enable_slicing": _same("VAE slicing"),
    "vae_enable_patch_conv": _same("VAE patch conv"),
    # checkpoints, validation, logging
    "checkpoint_step_interval": _same("checkpoint every N steps (old name checkpointing_steps)", CLI_UTILS),
    "checkpointing_steps": _same("old name of checkpoint_step_interval", CLI_UTILS),
    "checkpoints_total_limit": _same("keep the newest N checkpoints; default 5 as SimpleTuner"),
    "resume_from_checkpoint": _same(
        "latest (SimpleTuner's default), a checkpoint name in output_dir/checkpoints or a path; empty: fresh start"
    ),
    "validation_step_interval": _same("validate every N steps (old name validation_steps)", CLI_UTILS),
    "validation_steps": _same("old name of validation_step_interval", CLI_UTILS),
    "validation_disable": _same("no validation videos"),
    "validation_prompt": _same("validation prompt"),
    "validation_negative_prompt": _same("validation negative prompt"),
    "validation_resolution": _same("WxH, an int N (NxN), or a comma list (the first is used, the rest noted)"),
    "validation_num_video_frames": _same("frames of the validation video"),
    "validation_guidance": _same("guidance scale; omitted: 6.0 (Tencent's) on purpose, SimpleTuner's is 7.5"),
    "validation_num_inference_steps": _same("sampling steps"),
    "validation_seed": _same("validation noise seed"),
    "validation_prompt_library": _same("false only; true is refused (hvtune validates one prompt)"),
    "report_to": _same("tensorboard, wandb or none"),
    "tracker_project_name": _same("tracker project (wandb project)"),
    "tracker_run_name": _same("tracker run name"),
    "instance_prompt": _same("default of each dataset's instance_prompt", FACTORY),
    "prepend_instance_prompt": _same("default of each dataset's prepend_instance_prompt", FACTORY),
    "caption_strategy": _same("default of each dataset's caption_strategy (filename)", FACTORY),
    "only_instance_prompt": _same("true: every dataset uses only its instance_prompt", FACTORY),
    "allow_unsupported_keys": _same("hvtune: accept refused keys with a notice instead of an error"),
    # no effect on the LoRA
    "hub_model_id": _ignored(_HUB),
    "push_to_hub": _ignored(_HUB),
    "push_checkpoints_to_hub": _ignored(_HUB),
    "push_to_hub_background": _ignored(_HUB),
    "disable_benchmark": _ignored("SimpleTuner's pre-training benchmark validation; hvtune has none"),
    "compress_disk_cache": _ignored("cache storage format"),
    "vae_batch_size": _ignored(_SPEED),
    "text_encoder_batch_size": _ignored(_SPEED),
    "attention_mechanism": _ignored(_SPEED),
    "disable_bucket_pruning": _ignored("hvtune keeps every usable sample; its report lists skipped ones"),
    "delete_problematic_images": _ignored("hvtune never deletes sources; it reports them"),
    "offload_during_startup": _ignored(_SPEED),
    "quantize_via": _ignored(_SPEED),
    "num_processes": _ignored("set by the launcher (accelerate/torchrun), as in SimpleTuner"),
    "num_validation_images": _ignored("hvtune writes one validation video per validation"),
    "validation_disable_unconditional": _ignored("validation only"),
    "framerate": _ignored("validation video fps; see validation_fps"),
    "strict_epoch_limit": _ignored("hvtune stops exactly at max_train_steps"),
    "allow_dataset_oversubscription": _ignored("hvtune uses each dataset's repeats as written"),
    "trust_remote_code": _ignored("hvtune loads no remote code"),
    "gradient_checkpointing_backend": _ignored(_SPEED),
    "gradient_checkpointing_interval": _ignored(_SPEED),
    "gradient_checkpointing_segment_stride": _ignored(_SPEED),
    "vae_enable_temporal_roll": _ignored(_SPEED),
    "lora_format": _ignored("hvtune writes the diffusers and the ComfyUI format"),
    "logging_dir": _ignored(_LOGGING),
    "checkpoint_epoch_interval": _ignored("checkpoint timing only; use checkpoint_step_interval"),
    # changes training; hvtune does not do it
    "context_parallel_size": _refused("context parallelism is not implemented; use 1"),
    "context_parallel_comm_strategy": _refused("context parallelism is not implemented"),
    "distillation_method": _refused("distillation is not implemented"),
    "distillation_config": _refused("distillation is not implemented"),
    "tread_config": _refused("TREAD token routing is not implemented"),
    "sdnq_use_hadamard": _refused("SDNQ quantisation is not implemented; use base_model_precision int8-torchao"),
    "gradient_precision": _refused("hvtune accumulates LoRA gradients in fp32 (SimpleTuner's fp32 setting)"),
    "pretrained_t5_model_name_or_path": _refused("not a HunyuanVideo component"),
}

# Options other model families register (helpers/models/field_registry/*.py), seen in the Wan/LTX examples.
TRAIN_KEYS.update(
    {
        key: _refused("an option of another model family (LTX-2 conditioning, SDNQ), not HunyuanVideo 1.5")
        for key in (
            "ltx2_intrinsic_conditioning",
            "ltx2_reference_temporal_scale_factor",
            "ltx2_reference_spatial_scale_factor",
            "ltx2_prefix_conditioning_probability",
            "ltx2_prefix_conditioning_frames",
            "ltx2_first_frame_conditioning_probability",
            "sdnq_hadamard_group_size",
        )
    }
)

# EMA, LyCORIS, dataset i2v validation and the block-swap options (hvtune.train.ema, hvtune.config.lycoris, validation).
EMA = "helpers/training/ema.py"
FEATURE_KEYS: dict[str, KeyPolicy] = {
    "lora_type": _same("standard (peft LoRA) or lycoris (LoKr / LoHa through peft, with LyCORIS' per-layer rules)"),
    "lycoris_config": _same("the LyCORIS JSON (algo lokr or loha); keys hvtune cannot train as asked are refused"),
    "use_ema": _same("EMA of the LoRA weights, exported to output_dir/ema/ and kept in checkpoints", EMA),
    "ema_decay": _same("decay min(n / (9 + n), ema_decay) after a first copy", EMA),
    "ema_update_interval": _same("update every N optimizer steps (None: every step)", EMA),
    "ema_validation": _same("comparison, ema_only or none", EMA),
    "ema_device": _ignored("where the EMA copy lives; no effect on the LoRA (hvtune keeps it in float32)"),
    "ema_cpu_only": _ignored("where the EMA copy lives; no effect on the LoRA"),
    "ema_foreach_disable": _ignored("a speed knob of the update; no effect on the LoRA"),
    "ema_warmup_steps": _refused("EMA warm-up is not implemented: leave it unset"),
    "validation_using_datasets": _same("i2v: also validate on training samples' first frames and captions"),
    "eval_dataset_id": _same("which datasets those samples come from (default: all)"),
    "num_eval_images": _same("samples per dataset for validation_using_datasets"),
    "musubi_blocks_to_swap": _refused(
        "block swap moves only the last N blocks; hvtune offloads every block: use enable_group_offload "
        "with group_offload_type block_level"
    ),
    "ramtorch": _refused("use enable_group_offload with group_offload_type leaf_level, hvtune's equivalent"),
    "ramtorch_target_modules": _ignored("only read with ramtorch, which is refused"),
    "ramtorch_transformer_percent": _ignored("only read with ramtorch, which is refused"),
    "ramtorch_text_encoder": _ignored("only read with ramtorch, which is refused"),
    "ramtorch_disable_extensions": _ignored("only read with ramtorch, which is refused"),
    "ramtorch_disable_sync_hooks": _ignored("only read with ramtorch, which is refused"),
}

# Keys inside one dataset entry of multidatabackend.json (SimpleTuner: helpers/data_backend/factory.py).
DATASET_KEYS: dict[str, KeyPolicy] = {
    "id": _same("unique dataset id"),
    "type": _same("local only"),
    "dataset_type": _same("video, image, text_embeds"),
    "instance_data_dir": _same("folder of clips/images"),
    "caption_strategy": _same(
        "textfile, filename (SimpleTuner's default when omitted), instanceprompt, metadata", FACTORY
    ),
    "instance_prompt": _same("a string or a list (one caption variant per entry)"),
    "prepend_instance_prompt": _same("instance_prompt + ' ' + caption", "helpers/prompts.py"),
    "only_instance_prompt": _same("use instance_prompt as the only caption", "helpers/prompts.py"),
    "metadata_file": _same("hvtune: jsonl/csv captions for caption_strategy metadata"),
    "resolution": _same("see resolution_type", FACTORY),
    "resolution_type": _same("pixel, area, pixel_area (default: the top-level one, pixel_area)", FACTORY),
    "minimum_image_size": _same("skip smaller sources", "helpers/metadata/backends/base.py"),
    "maximum_image_size": _same("no effect without crop (SimpleTuner too); see target_downsample_size", SAMPLE),
    "target_downsample_size": _same("no effect without crop; with crop and maximum_image_size refused", SAMPLE),
    "crop": _same("crop to the bucket (false: resize to the bucket, cropping only the rounding excess)", SAMPLE),
    "crop_style": _same("center/centre; random, corner and face are refused (hvtune crops the centre)", FACTORY),
    "crop_aspect": _same("square or preserve; random/closest (crop_aspect_buckets) are refused", SAMPLE),
    "video": _same("num_frames, min_frames, max_frames, bucket_strategy, frame_interval; hvtune: frame_rate"),
    "repeats": _same("extra passes over the dataset per epoch"),
    "default": _same("the default text_embeds dataset"),
    "cache_dir": _same("text-embed cache folder"),
    "cache_dir_vae": _same("latent cache folder"),
    "disabled": _same("skip this dataset"),
    "disable": _same("skip this dataset (SimpleTuner reads both names)", FACTORY),
    "metadata_backend": _ignored("hvtune probes files itself"),
    "compress_cache": _ignored("cache storage format"),
    "skip_file_discovery": _ignored("hvtune always scans"),
    "preserve_data_backend_cache": _ignored("hvtune's probe index revalidates by size and mtime"),
    "write_batch_size": _ignored(_SPEED),
    "vae_cache_clear_each_epoch": _ignored("hvtune's cache is fixed per sample"),
    "hash_filenames": _ignored("cache file naming"),
    "disable_validation": _ignored("validation only"),
    "huggingface": _refused("hub datasets are not supported; download the clips and use type local"),
    "dataset_name": _refused("hub datasets are not supported; download the clips and use type local"),
    "crop_aspect_buckets": _refused("random/closest crop aspects are not implemented"),
    "caption_filter_list": _refused("caption filters are not implemented; edit the captions"),
    "is_regularisation_data": _refused("regularisation datasets are not implemented"),
    "is_regularization_data": _refused("regularisation datasets are not implemented"),
    "conditioning": _refused("conditioning datasets are not implemented"),
    "conditioning_data": _refused("conditioning datasets are not implemented"),
    "probability": _refused("dataset sampling probabilities are not implemented (hvtune uses every sample)"),
    "max_upscale_threshold": _refused("hvtune never upscales (sources below the bucket are skipped)"),
    "text_embeds": _refused("per-dataset text-embed routing is not implemented; hvtune uses the default one"),
}

VIDEO_KEYS: dict[str, KeyPolicy] = {
    "num_frames": _same("frames per sample"),
    "min_frames": _same("shorter clips are skipped (default num_frames)"),
    "max_frames": _same("longer clips are skipped"),
    "bucket_strategy": _same("aspect_ratio or resolution_frames"),
    "frame_interval": _same("resolution_frames frame step"),
    "frame_rate": _same(
        "hvtune: resample clips to this fps before choosing frames. SimpleTuner 4.10.1 does not read it (it never "
        "resamples): kept on purpose for the seed guide's configs"
    ),
    "is_i2v": _same("accepted; i2v conditioning follows model_flavour (SimpleTuner sets it from the model too)"),
}


@cache
def simpletuner_defaults() -> dict[str, Any]:
    """Every SimpleTuner 4.10.1 option -> its default (the field registry; see simpletuner_options.json)."""
    doc = json.loads((Path(__file__).with_name("simpletuner_options.json")).read_text(encoding="utf-8"))
    return {name: entry["default"] for name, entry in doc["options"].items()}


def train_policy(key: str) -> KeyPolicy | None:
    return TRAIN_KEYS.get(key) or FEATURE_KEYS.get(key)


def is_simpletuner_default(key: str, value: Any) -> bool:
    defaults = simpletuner_defaults()
    if key not in defaults:
        return False
    default = defaults[key]
    return value == default or (default is None and value in ("", False, 0, None))


def classify_unknown(key: str, value: Any) -> tuple[str, str]:
    """(group, reason) for a training key hvtune has no field for: group is "ignored", "refused" or "unknown"."""
    policy = train_policy(key)
    if policy is not None and policy.status == "ignored":
        return "ignored", policy.note
    if is_simpletuner_default(key, value):
        return "ignored", "set to SimpleTuner's default, which asks for nothing"
    if policy is not None and policy.status == "refused":
        return "refused", policy.note
    if key in simpletuner_defaults():
        return (
            "refused",
            f"a SimpleTuner option hvtune does not implement (its default is {simpletuner_defaults()[key]!r})",
        )
    return "unknown", "not a SimpleTuner 4.10.1 option nor an hvtune one (a typo?)"


# SimpleTuner optimizer name -> (hvtune implementation, SimpleTuner's default_settings for it), from
# helpers/training/optimizer_param.py. hvtune's trainable weights are the float32 LoRA weights, so the bf16
# stochastic-rounding / Kahan-summation variants compute the same update as plain float32 AdamW.
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw_bf16": ("torch.AdamW", {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-6}),
    "torch-adamw": ("torch.AdamW", {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}),
    "torch-adam": ("torch.Adam", {"betas": (0.9, 0.999), "weight_decay": 0.0, "eps": 1e-8}),
    "optimi-adamw": ("torch.AdamW", {"betas": (0.9, 0.99), "weight_decay": 0.0, "eps": 1e-6}),
    "bnb-adamw": ("bnb.AdamW", {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-6}),
    "bnb-adamw8bit": ("bnb.AdamW8bit", {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-6}),
    "ao-adamw8bit": ("torchao.AdamW8bit", {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-6}),
    # hvtune's earlier names (SimpleTuner 4.10.1 removed adamw8bit: it raises for it)
    "adamw": ("torch.AdamW", {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}),
    "adamw8bit": ("bnb.AdamW8bit", {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-6}),
}

# SimpleTuner optimizers hvtune does not have -> the nearest one it has.
NEAREST_OPTIMIZER: dict[str, str] = {
    "optimi-stableadamw": "optimi-adamw",
    "optimi-lion": "optimi-adamw",
    "optimi-radam": "optimi-adamw",
    "optimi-ranger": "optimi-adamw",
    "optimi-adan": "optimi-adamw",
    "optimi-adam": "torch-adam",
    "optimi-sgd": "torch-adamw",
    "prodigy": "adamw_bf16",
    "ao-adamw4bit": "ao-adamw8bit",
    "ao-adamfp8": "ao-adamw8bit",
    "ao-adamwfp8": "ao-adamw8bit",
    "bnb-adam": "torch-adam",
    "bnb-adam8bit": "bnb-adamw8bit",
    "bnb-adamw-paged": "bnb-adamw",
    "bnb-adamw8bit-paged": "bnb-adamw8bit",
    "torch-sgd": "torch-adamw",
}

# SimpleTuner's lr_scheduler names (helpers/training/custom_schedule.py get_lr_scheduler). constant,
# constant_with_warmup, linear and polynomial are diffusers' schedules there too; cosine, cosine_with_restarts and
# sine are SimpleTuner's own classes, whose period is lr_warmup_steps (memory.build_lr_scheduler restates them).
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "polynomial", "cosine", "cosine_with_restarts", "sine")
NEEDS_WARMUP_PERIOD = ("cosine_with_restarts", "sine")  # SimpleTuner raises for T_0 = lr_warmup_steps = 0


def optimizer_problem(name: str) -> str | None:
    if name in OPTIMIZERS:
        return None
    if name in NEAREST_OPTIMIZER:
        return f"not available in hvtune; the nearest is {NEAREST_OPTIMIZER[name]}"
    return f"unknown optimizer; one of {', '.join(OPTIMIZERS)}"


def scheduler_problem(name: str, warmup_steps: int) -> str | None:
    if name not in SCHEDULERS:
        return f"unknown lr_scheduler; one of {', '.join(SCHEDULERS)}"
    if name in NEEDS_WARMUP_PERIOD and warmup_steps <= 0:
        return f"SimpleTuner's {name} uses lr_warmup_steps as its period: set lr_warmup_steps > 0"
    return None


def optimizer_settings(name: str, optimizer_config: str | None, beta1: float | None, beta2: float | None) -> dict:
    """SimpleTuner's optimizer_parameters: the optimizer's default_settings, then optimizer_config "k=v,...",
    then optimizer_beta1/2 (helpers/training/optimizer_param.py convert_arg_to_parameters)."""
    settings = dict(OPTIMIZERS[name][1])
    for item in (optimizer_config or "").split(","):
        if "=" not in item:
            continue
        key, text = (part.strip() for part in item.split("=", 1))
        value: Any = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        elif text.lower() == "none":
            value = None
        else:
            with suppress(ValueError):
                value = float(text) if any(c in text for c in ".eE") else int(text)
        settings[key] = value
    if beta1 is not None and beta2 is not None:
        settings["betas"] = (beta1, beta2)
    return settings


# Defaults hvtune keeps different from SimpleTuner's on purpose; `hvtune check` prints the reason on the key's line
# when the key is omitted. tests/test_simpletuner.py fails for any other default that differs.
KEPT_DEFAULTS: dict[str, str] = {
    "model_type": "SimpleTuner's default is full; hvtune trains LoRAs only",
    "model_family": "hvtune is for HunyuanVideo 1.5 only",
    "pretrained_model_name_or_path": "HunyuanVideo 1.5's hub id (SimpleTuner has none)",
    "model_flavour": "SimpleTuner's HunyuanVideo default flavour t2v-480p (helpers/models/hunyuanvideo/model.py)",
    "output_dir": "hvtune's output folder name",
    "lycoris_config": "unset reads SimpleTuner's default config/lycoris_config.json, resolved beside the config file",
    "cache_dir": "hvtune's cache folder (SimpleTuner: output_dir/cache)",
    "seed": "SimpleTuner leaves training unseeded; hvtune is reproducible by default (42)",
    "lora_dropout": "SimpleTuner's 0.1 draws dropout masks per process, so runs on different GPU counts differ; "
    "hvtune's 0.0 keeps them identical (set 0.1 to match SimpleTuner)",
    "resolution": "SimpleTuner's 1024 (pixel_area) is above the 480p/720p model's size; the flavour's 480/720",
    "train_batch_size": "SimpleTuner's 4 does not fit video on most GPUs; 1",
    "learning_rate": "SimpleTuner's 4e-7 is its full fine-tune rate; 1e-4 is a LoRA rate",
    "caption_dropout_probability": "SimpleTuner's None is 0 (no dropout)",
    "validation_resolution": "SimpleTuner's 256 is not a video size; the flavour's 848x480 or 1280x720",
    "validation_num_video_frames": "SimpleTuner's None renders the pipeline default; hvtune 61",
    "validation_guidance": "validation only: Tencent's 6.0 for HunyuanVideo 1.5 (SimpleTuner 7.5)",
    "validation_negative_prompt": "validation only: empty",
    "validation_prompt": "validation only: a neutral prompt",
    "validation_step_interval": "validation only: at the end of training (SimpleTuner every 100 steps)",
    "report_to": "logging only: TensorBoard (SimpleTuner none)",
    "tracker_project_name": "logging only",
    "tracker_run_name": "logging only",
}


def render_markdown() -> str:
    """docs/SIMPLETUNER.md; tests/test_simpletuner.py checks the file equals this."""
    lines = [
        "# SimpleTuner options in hvtune",
        "",
        "Generated by `python -m hvtune.config.simpletuner > docs/SIMPLETUNER.md`; tests/test_simpletuner.py keeps",
        f"them equal. Meanings were read from SimpleTuner {VERSION}'s wheel",
        f"(`pip download --no-deps simpletuner=={VERSION}`); the source paths below are inside it.",
        "",
        "- **same**: hvtune does what SimpleTuner does. **ignored**: no effect on the LoRA, reported as a notice.",
        "- **refused**: changes training in SimpleTuner, hvtune does not do it: `hvtune check` fails naming the key,",
        "  unless the value is SimpleTuner's default or `allow_unsupported_keys: true` (then a notice says it is not",
        "  applied). Any other SimpleTuner option set to a non-default value is refused the same way; unknown keys are",
        "  reported as unknown.",
        "",
    ]

    def table(title: str, entries: dict[str, KeyPolicy]) -> None:
        lines.extend([f"## {title}", "", "| key | status | in hvtune | SimpleTuner source |", "|---|---|---|---|"])
        for key, p in entries.items():
            lines.append(f"| `{key}` | {p.status} | {p.note.replace('|', '/')} | {p.source and f'`{p.source}`'} |")
        lines.append("")

    table("config.json", TRAIN_KEYS)
    table("config.json: EMA, LyCORIS, dataset validation, block swap", FEATURE_KEYS)
    table("multidatabackend.json: one dataset", DATASET_KEYS)
    table("multidatabackend.json: a dataset's `video`", VIDEO_KEYS)
    lines.extend(["## Optimizers", "", "| SimpleTuner name | hvtune implementation | SimpleTuner's default settings |"])
    lines.append("|---|---|---|")
    for name, (impl, settings) in OPTIMIZERS.items():
        lines.append(f"| `{name}` | {impl} | {settings} |")
    for name, nearest in NEAREST_OPTIMIZER.items():
        lines.append(f"| `{name}` | refused: nearest `{nearest}` | |")
    lines.extend(["", "## Defaults kept different on purpose", "", "| key | why |", "|---|---|"])
    lines.extend(f"| `{k}` | {v} |" for k, v in KEPT_DEFAULTS.items())
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # regenerate the docs: python -m hvtune.config.simpletuner > docs/SIMPLETUNER.md
    print(render_markdown(), end="")
