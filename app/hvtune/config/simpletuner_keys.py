"""What each SimpleTuner 4.10.1 option means in hvtune: the key tables `hvtune check`, the config loader and
docs/SIMPLETUNER.md (generated from them by `hvtune.config.simpletuner`; tests/test_simpletuner.py keeps them equal)
read.

Every key of a config.json is one of:
- `same`: hvtune does what SimpleTuner does with it (the note says how, and cites SimpleTuner's code).
- `ignored`: it has no effect on the trained LoRA (logging, hub upload, speed knobs hvtune sets itself): a notice.
- `refused`: SimpleTuner changes training with it and hvtune does not do that: an error naming the key and what to do,
  unless the value is SimpleTuner's own default (then it asks for nothing) or the user sets
  `allow_unsupported_keys: true` (then it is a notice saying the result will differ from SimpleTuner's).
Keys SimpleTuner does not know either (typos, other trainers' keys) are reported as unknown.

Paths below are inside the wheel `simpletuner-4.10.1-py3-none-any.whl`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from hvtune.flavours import FLAVOURS

VERSION = "4.10.1"
REGISTRY = "simpletuner_sdk/server/services/field_registry/sections"
TRAINER = "helpers/training/trainer.py"
CMD_ARGS = "helpers/configuration/cmd_args.py"
FACTORY = "helpers/data_backend/factory.py"
IMAGE = "helpers/multiaspect/image.py"
SAMPLE = "helpers/image_manipulation/training_sample.py"
OPTIMIZER_PARAM = "helpers/training/optimizer_param.py"
CUSTOM_SCHEDULE = "helpers/training/custom_schedule.py"
HUNYUAN = "helpers/models/hunyuanvideo/model.py"
CLI_UTILS = "helpers/configuration/cli_utils.py"


@dataclass(frozen=True)
class KeyPolicy:
    status: str  # "same" | "ignored" | "refused"
    note: str
    source: str = ""


# _same(note, source=""), _ignored(...), _refused(...): one KeyPolicy of that status
_same, _ignored, _refused = (partial(KeyPolicy, status) for status in ("same", "ignored", "refused"))


_LOGGING = "logging/tracking only; no effect on the LoRA"
_HUB = "hvtune never uploads; no effect on the LoRA"
_SPEED = "a speed or memory knob hvtune decides itself; no effect on the LoRA"

# Training keys (config.json). hvtune's own extensions are marked "hvtune:".
TRAIN_KEYS: dict[str, KeyPolicy] = {
    # model
    "model_type": _same("lora only (full fine-tuning is refused by the value check)"),
    "model_family": _same("hunyuanvideo only"),
    "model_flavour": _same(", ".join(FLAVOURS), HUNYUAN),
    "pretrained_model_name_or_path": _same("hub id or local folder"),
    "revision": _same("hub revision"),
    "base_model_precision": _same(
        "no_change (SimpleTuner's default) keeps the base in the mixed_precision dtype (bf16), 'no' in fp32; "
        "bf16; int8-torchao; fp8wo-torchao (fp8 weights, bf16 matmuls); fp8-torchao (torchao float8 training: fp8 "
        "matmuls, refused on a card without them). Other quantisations are refused with int8-torchao as the nearest",
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
        "constant, constant_with_warmup, linear, polynomial (diffusers' schedules, as SimpleTuner; constant with "
        "lr_warmup_steps > 0 runs as constant_with_warmup and cosine_with_warmup is cosine, as SimpleTuner's "
        "cli_utils.normalize_lr_scheduler_value makes them); cosine, "
        "cosine_with_restarts, sine as SimpleTuner's own classes compute them: period lr_warmup_steps, no warmup, "
        "floor to lr_end; cosine_with_restarts stays at learning_rate (its steps_per_epoch=-1 keeps T_cur at 0)",
        CUSTOM_SCHEDULE,
    ),
    "lr_warmup_steps": _same("linear warmup steps"),
    "lr_num_cycles": _ignored("SimpleTuner passes it to diffusers' schedules, none of which uses it for its names"),
    "lr_power": _same("power of polynomial"),
    "lr_end": _same("final lr of polynomial"),
    "max_train_steps": _same("0 or absent: use num_train_epochs", CMD_ARGS),
    "num_train_epochs": _same("0: use max_train_steps", CMD_ARGS),
    "optimizer": _same("SimpleTuner's names, mapped in train.optim (see docs/SIMPLETUNER.md)", OPTIMIZER_PARAM),
    "optimizer_config": _same("comma list key=value passed to the optimizer, as SimpleTuner does", OPTIMIZER_PARAM),
    "optimizer_beta1": _same("overrides the optimizer's beta1 (with optimizer_beta2)", OPTIMIZER_PARAM),
    "optimizer_beta2": _same("overrides the optimizer's beta2 (with optimizer_beta1)", OPTIMIZER_PARAM),
    "adam_beta1": _ignored("SimpleTuner passes it only to DeepSpeed's optimizer; use optimizer_beta1", OPTIMIZER_PARAM),
    "adam_beta2": _ignored("SimpleTuner passes it only to DeepSpeed's optimizer; use optimizer_beta2", OPTIMIZER_PARAM),
    "adam_epsilon": _ignored(
        "SimpleTuner passes it only to DeepSpeed's optimizer; use optimizer_config eps=", OPTIMIZER_PARAM
    ),
    "adam_weight_decay": _ignored(
        "SimpleTuner passes it only to DeepSpeed's optimizer; use optimizer_config weight_decay=", OPTIMIZER_PARAM
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
    "vae_enable_tiling": _same(
        "VAE tiling of the cache's encode and the validation decode; omitted: the cache encodes untiled (retried "
        "tiled when a clip does not fit) and the validation decode tiles"
    ),
    "vae_dtype": _same("the VAE's dtype for the cache's encode and the validation decode on a GPU (float32 on CPU)"),
    "vae_enable_slicing": _same("VAE slicing"),
    "vae_enable_patch_conv": _same("VAE patch conv"),
    "context_parallel_size": _same("each sample's sequence split over N processes; data parallel over the rest"),
    "context_parallel_comm_strategy": _same("alltoall: Ulysses; allgather (ring) is refused: it cannot train here"),
    # checkpoints, validation, logging
    "checkpoint_step_interval": _same("checkpoint every N steps (old name checkpointing_steps)", CLI_UTILS),
    "checkpointing_steps": _same("old name of checkpoint_step_interval", CLI_UTILS),
    "checkpoints_total_limit": _same("keep the newest N checkpoints; default 5 as SimpleTuner"),
    "checkpointing_rolling_steps": _same(
        "also checkpoint every N steps (when no regular checkpoint is due) as checkpoint-N-rolling, a series of "
        "its own; 0 (default): none",
        TRAINER,
    ),
    "checkpoints_rolling_total_limit": _same("keep the newest N rolling checkpoints (default 1)", TRAINER),
    "resume_from_checkpoint": _same(
        "latest (SimpleTuner's default), a checkpoint name in output_dir/checkpoints or a path; empty: fresh start"
    ),
    "validation_step_interval": _same("validate every N steps (old name validation_steps)", CLI_UTILS),
    "validation_steps": _same("old name of validation_step_interval", CLI_UTILS),
    "validation_disable": _same("no validation videos"),
    "validation_prompt": _same(
        "validation prompt; null (SimpleTuner's default): no validation videos, as SimpleTuner without a prompt",
        "helpers/training/validation.py",
    ),
    "validation_negative_prompt": _same("validation negative prompt; null: empty"),
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
    "data_backend_sampling": _same(
        "how SimpleTuner picks the dataset of each batch; with one training dataset both values draw the same. "
        "hvtune trains every sample of every dataset each epoch (times repeats); uniform with several is refused",
        "helpers/data_backend/runtime/dataloader_iterator.py",
    ),
    "only_instance_prompt": _same("true: every dataset uses only its instance_prompt", FACTORY),
    "allow_unsupported_keys": _same("hvtune: accept refused keys with a notice instead of an error"),
    "train_on_cache_as_is": _same("hvtune: train although clips or captions changed since `hvtune cache` (announced)"),
    # no effect on the LoRA
    "hub_model_id": _ignored(_HUB),
    "push_to_hub": _ignored(_HUB),
    "push_checkpoints_to_hub": _ignored(_HUB),
    "push_to_hub_background": _ignored(_HUB),
    "disable_benchmark": _ignored("SimpleTuner's pre-training benchmark validation; hvtune has none"),
    "compress_disk_cache": _ignored("cache storage format"),
    "vae_batch_size": _ignored(_SPEED),
    "text_encoder_batch_size": _ignored(_SPEED),
    "attention_mechanism": _same(
        "the attention kernel (diffusers' dispatcher backend): SDPA by default (kohaku-fa-auto, diffusers), native*, "
        "flex, flash-attn*, sageattention*, xformers, aiter where the package and card exist (else refused at check)",
        "helpers/training/attention_backend.py",
    ),
    "sageattention_usage": _same(
        "where SageAttention runs: inference (validation; default), training, training+inference; SDPA elsewhere",
        "helpers/training/attention_backend.py",
    ),
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
    "skip_file_discovery": _ignored("hvtune always scans (its probe index makes a rescan cheap)"),
    "gradient_precision": _ignored("hvtune's LoRA weights, and so their gradients, are always fp32"),
    "eval_steps_interval": _ignored("evaluation loss only; hvtune has no eval datasets"),
    "user_prompt_library": _ignored("validation only: hvtune validates validation_prompt (no prompt library)"),
    "validation_guidance_rescale": _ignored("validation only: not applied to hvtune's validation videos"),
    "validation_guidance_skip_layers": _ignored("validation only: not applied to hvtune's validation videos"),
    "evaluation_type": _ignored("evaluation scores of validation images only; hvtune computes none"),
    "tokenizer_max_length": _ignored(
        "SimpleTuner's HunyuanVideo model does not read it (its pipeline pads the prompt to 1000 tokens)", HUNYUAN
    ),
    # changes training; hvtune does not do it
    # FSDP (several processes, helpers/training/trainer.py _load_fsdp_plugin): docs/PERFORMANCE.md#scale-out
    "fsdp_enable": _same("FSDP2 through accelerate: the frozen base sharded, the LoRA replicated", TRAINER),
    "fsdp_version": _same("2 only (FSDP1 is refused)", TRAINER),
    "fsdp_reshard_after_forward": _same("FSDP2's reshard_after_forward for every wrapped block", TRAINER),
    "fsdp_state_dict_type": _ignored("checkpoints hold the whole LoRA, never the base: any process count resumes"),
    "fsdp_cpu_ram_efficient_loading": _ignored("host RAM only: each process loads the base itself"),
    "fsdp_auto_wrap_policy": _ignored("hvtune wraps each block (TRANSFORMER_BASED_WRAP, SimpleTuner's default)"),
    "fsdp_transformer_layer_cls_to_wrap": _ignored("hvtune wraps the transformer's _no_split_modules"),
    "fsdp_limit_all_gathers": _ignored("an FSDP1 setting; FSDP2 has none"),
    "fsdp_activation_checkpointing": _refused("use gradient_checkpointing: true (it works with FSDP2)", TRAINER),
    "fsdp_cpu_offload": _refused("not supported with FSDP2; enable_group_offload offloads without fsdp_enable"),
    "distillation_method": _refused("distillation is not implemented"),
    "distillation_config": _refused("distillation is not implemented"),
    "tread_config": _refused("TREAD token routing is not implemented"),
    "sdnq_use_hadamard": _refused("SDNQ quantisation is not implemented; use base_model_precision int8-torchao"),
    "peft_lora_target_modules": _refused(
        "hvtune's key for this list is lora_target_modules (peft module names, or a preset: simpletuner, "
        "main_blocks): rename it"
    ),
    "pretrained_t5_model_name_or_path": _refused("not a HunyuanVideo component"),
}

# torch.compile (SimpleTuner's dynamo_* keys): hvtune.train.compile
_COMPILE = "torch.compile of the transformer after the LoRA is added (hvtune.train.compile)"
TRAIN_KEYS.update(
    {
        "dynamo_backend": _same(f"{_COMPILE}: no (eager, default) or a torch.compile backend such as inductor"),
        "dynamo_mode": _same(f"{_COMPILE}: torch.compile's mode ('' = its default)"),
        "dynamo_fullgraph": _same(f"{_COMPILE}: torch.compile's fullgraph"),
        "dynamo_dynamic": _same(f"{_COMPILE}: true marks shapes dynamic (one graph for every bucket)"),
        "dynamo_use_regional_compilation": _same(
            f"{_COMPILE}: true compiles the repeated blocks only (diffusers' compile_repeated_blocks), false the "
            "whole transformer"
        ),
    }
)
TRAIN_KEYS.update(
    {
        key: _ignored(
            "torch.compile cache and wrapper settings: hvtune compiles afresh each run; no effect on the LoRA"
        )
        for key in (
            "dynamo_wrapper",
            "dynamo_cache_export",
            "dynamo_cache_export_after_first_step",
            "dynamo_hub_repo_id",
        )
    }
)

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
    "musubi_blocks_to_swap": _same(
        "N > 0 runs as enable_group_offload (block_level, 1 block per group), announced: every block offloaded, "
        "less memory than swapping N and no slower with group_offload_use_stream (hvtune plan, docs/PERFORMANCE.md)"
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
    "probability": _same("1.0 only (SimpleTuner's default: every sample each epoch); other weights are refused"),
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
    "max_upscale_threshold": _refused("hvtune never upscales (sources below the bucket are skipped)"),
    "text_embeds": _refused("per-dataset text-embed routing is not implemented; hvtune uses the default one"),
}

VIDEO_KEYS: dict[str, KeyPolicy] = {
    "num_frames": _same("frames per sample"),
    "min_frames": _same(
        "shorter clips are skipped (default num_frames; SimpleTuner requires >= num_frames). hvtune also takes a "
        "smaller one, training a shorter clip at its own 4n+1 length, with a notice",
        FACTORY,
    ),
    "max_frames": _same("longer clips are skipped"),
    "bucket_strategy": _same("aspect_ratio or resolution_frames"),
    "frame_interval": _same("resolution_frames frame step"),
    "frame_rate": _same(
        "hvtune: resample clips to this fps before choosing frames. SimpleTuner 4.10.1 does not read it (it never "
        "resamples): kept on purpose for the seed guide's configs"
    ),
    "is_i2v": _same("accepted; i2v conditioning follows model_flavour (SimpleTuner sets it from the model too)"),
}
