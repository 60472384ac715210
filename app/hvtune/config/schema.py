"""The configuration's fields: SimpleTuner's key names, types and defaults for config.json (`TrainConfig`) and for one
dataset of multidatabackend.json (`DatasetConfig`). Cross-field rules live in `hvtune.config.rules` and
`hvtune.config.backends`; the layering of defaults, file, environment and flags in `hvtune.config.layering`."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hvtune.flavours import DEFAULT_FLAVOUR, FLAVOURS, MODEL_REPO, FlavourSpec


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @property
    def unknown_keys(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


CaptionStrategy = Literal["textfile", "filename", "instanceprompt", "metadata"]
# lora_target_modules by name (train.lora turns them into peft targets): "simpletuner" is SimpleTuner 4.10.1's set for
# HunyuanVideo (its DEFAULT_LORA_TARGET, every attention including the token refiner's), "main_blocks" hvtune's
# earlier default (the dual-stream blocks' attention only, minus the last block's modules that get no gradient)
LORA_TARGET_PRESETS = ("simpletuner", "main_blocks")


class VideoOptions(_Section):
    num_frames: int = 61
    min_frames: int | None = None
    max_frames: int | None = None
    frame_rate: float | None = None
    bucket_strategy: str = "aspect_ratio"
    frame_interval: int = 4
    is_i2v: bool | None = None


class DatasetConfig(_Section):
    id: str
    type: str = "local"
    dataset_type: Literal["video", "image", "text_embeds", "image_embeds"] = "video"
    instance_data_dir: str | None = None
    caption_strategy: CaptionStrategy = "filename"  # SimpleTuner's default (its top-level caption_strategy)
    instance_prompt: str | list[str] | None = None
    prepend_instance_prompt: bool = False
    only_instance_prompt: bool = False
    metadata_file: str | None = None
    resolution: int | float | str | None = None  # None: the top-level resolution
    resolution_type: Literal["pixel", "area", "pixel_area"] | None = None  # None: the top-level resolution_type
    minimum_image_size: float | None = None
    maximum_image_size: float | None = None
    target_downsample_size: float | None = None
    crop: bool = False
    crop_style: Literal["random", "corner", "center", "centre", "face"] = "random"
    crop_aspect: Literal["square", "preserve", "random", "closest"] = "square"
    video: VideoOptions = Field(default_factory=VideoOptions)
    repeats: int = Field(0, ge=0)
    default: bool = False
    cache_dir: str | None = None
    cache_dir_vae: str | None = None
    disabled: bool = False
    disable: bool = False
    probability: float = Field(1.0, ge=0.0)  # SimpleTuner's sampling weight: only 1.0 (backends)

    @property
    def skipped(self) -> bool:
        """SimpleTuner skips a dataset with either `disabled` or `disable` set (data_backend/factory.py)."""
        return self.disabled or self.disable


class TrainConfig(_Section):
    # model
    model_type: Literal["lora"] = "lora"
    model_family: Literal["hunyuanvideo"] = "hunyuanvideo"
    pretrained_model_name_or_path: str = MODEL_REPO
    revision: str | None = None
    model_flavour: str = DEFAULT_FLAVOUR  # a FLAVOURS name: rules.check_flavour lists a bad one with the rest
    text_encoder_path: str | None = None
    vision_encoder_path: str | None = None
    base_model_precision: str = (
        "no_change"  # no_change, bf16, int8-torchao, fp8wo-torchao, fp8-torchao (kernels.fp8_problem per card)
    )
    # data and outputs
    data_backend_config: str | None = Field(None, alias="dataset_backend_config")
    instance_data_dir: str | None = None
    output_dir: str = "output/hunyuan-video"
    cache_dir: str = "cache"
    seed: int = 42  # SimpleTuner: unseeded; hvtune is reproducible by default (0: clock, -1: random, as SimpleTuner)
    resolution: int | float | None = None  # None: the flavour's short side (480 or 720) as pixel_area
    resolution_type: Literal["pixel", "area", "pixel_area"] = "pixel_area"
    aspect_bucket_alignment: int = Field(64, ge=16)
    aspect_bucket_rounding: int = Field(2, ge=0)
    minimum_image_size: float | None = None
    maximum_image_size: float | None = None
    target_downsample_size: float | None = None
    instance_prompt: str | list[str] | None = None
    prepend_instance_prompt: bool = False
    only_instance_prompt: bool = False
    caption_strategy: CaptionStrategy = "filename"  # each dataset's default, as SimpleTuner
    data_backend_sampling: Literal["auto-weighting", "uniform"] = "auto-weighting"  # uniform: one dataset only
    # LoRA
    lora_rank: int = Field(16, ge=1)
    lora_alpha: float | None = Field(None, gt=0)  # 0 would scale the LoRA to nothing: nothing would train
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # SimpleTuner 0.1; see simpletuner.KEPT_DEFAULTS
    lora_init_type: Literal["default", "gaussian"] = "default"
    lora_target_modules: str | list[str] = "simpletuner"  # a LORA_TARGET_PRESETS name or peft module names
    # optimisation
    train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = Field(0, ge=0)
    lr_power: float = 0.8
    lr_end: float = Field(4e-7, ge=0)
    max_train_steps: int | None = Field(None, ge=0)  # 0 or None: from num_train_epochs
    num_train_epochs: int = Field(1, ge=0)  # 0: from max_train_steps
    optimizer: str = "adamw_bf16"
    optimizer_config: str | None = None
    optimizer_beta1: float | None = None
    optimizer_beta2: float | None = None
    max_grad_norm: float = Field(2.0, ge=0)
    grad_clip_method: Literal["value", "norm"] = "value"
    mixed_precision: Literal["bf16", "no"] = "bf16"
    caption_dropout_probability: float = Field(0.0, ge=0.0, le=1.0)
    flow_schedule_shift: float = Field(3.0, ge=0)  # 0: no shift (SimpleTuner's custom_schedule.py)
    timestep_sampling: Literal["sigmoid", "uniform"] = "sigmoid"
    flow_use_uniform_schedule: bool = False
    flow_use_beta_schedule: bool = False
    flow_beta_schedule_alpha: float = Field(2.0, gt=0)
    flow_beta_schedule_beta: float = Field(2.0, gt=0)
    flow_schedule_auto_shift: bool = False
    flow_sigmoid_scale: float = Field(1.0, gt=0)
    # speed (hvtune.config.kernels): the attention kernel by SimpleTuner's name; its default runs PyTorch SDPA here
    attention_mechanism: str = "kohaku-fa-auto"
    sageattention_usage: str = "inference"  # SageAttention is not exact for training: validation only by default
    dynamo_backend: str = "no"  # torch.compile (hvtune.train.compile): no, inductor, or another torch backend
    dynamo_mode: str | None = ""  # "": torch's default; reduce-overhead, max-autotune, ...
    dynamo_fullgraph: bool = False
    dynamo_dynamic: bool = False
    dynamo_use_regional_compilation: bool = False  # true: the repeated blocks only (diffusers' compile_repeated_blocks)
    # scale-out (SimpleTuner's names and defaults): FSDP2 through accelerate, context parallel through diffusers
    fsdp_enable: bool = False
    fsdp_version: int = 2
    fsdp_reshard_after_forward: bool = True
    fsdp_state_dict_type: str = "SHARDED_STATE_DICT"
    fsdp_cpu_ram_efficient_loading: bool = False
    context_parallel_size: int = Field(1, ge=1)
    context_parallel_comm_strategy: str = "allgather"
    # memory
    gradient_checkpointing: bool = True
    enable_group_offload: bool = False
    group_offload_type: Literal["block_level", "leaf_level"] = "block_level"
    group_offload_blocks_per_group: int = Field(1, ge=1)
    group_offload_use_stream: bool = False
    enable_model_cpu_offload: bool = False
    vae_enable_patch_conv: bool = False
    vae_enable_tiling: bool | None = (
        None  # unset: the validation decode tiles (output/vae_decode.py), the cache does not
    )
    vae_dtype: Literal["default", "bf16", "fp16", "fp32"] = "bf16"
    vae_enable_slicing: bool = False
    # checkpoints, validation, logging
    checkpointing_steps: int = Field(500, ge=1, alias="checkpoint_step_interval")
    checkpoints_total_limit: int | None = Field(5, ge=1)
    checkpointing_rolling_steps: int = Field(0, ge=0)  # SimpleTuner: a second series, checkpoint-N-rolling
    checkpoints_rolling_total_limit: int | None = Field(1, ge=1)  # newest rolling checkpoints kept (SimpleTuner's 1)
    resume_from_checkpoint: str | None = "latest"
    overwrite_output_dir: bool = False  # replace another run's outputs in output_dir instead of refusing to mix them
    validation_steps: int = Field(0, ge=0, alias="validation_step_interval")
    validation_disable: bool = False
    validation_prompt: str | None = "A cat walks across a sunlit kitchen floor."  # null: no validation (rules)
    validation_negative_prompt: str | None = ""  # null: empty, SimpleTuner's default
    validation_resolution: str | int | list[str | int] | None = None
    validation_num_video_frames: int = 61
    validation_guidance: float = 6.0
    validation_num_inference_steps: int = Field(30, ge=1)
    validation_seed: int | None = None
    validation_image: str | None = None
    validation_fps: int = 24
    validation_prompt_library: bool = False
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    tracker_project_name: str = "hvtune"
    tracker_run_name: str | None = None
    deterministic: bool = True
    # SimpleTuner features added for issue 15, with SimpleTuner 4.10.1's defaults (ema.py, memory.lycoris_config)
    use_ema: bool = False
    ema_decay: float = Field(0.995, gt=0.0, le=1.0)
    ema_update_interval: int | None = Field(1, ge=1)  # None: every step, as in SimpleTuner
    ema_validation: Literal["none", "ema_only", "comparison"] = "comparison"
    lora_type: Literal["standard", "lycoris"] = "standard"
    lycoris_config: str | None = None  # a JSON file as SimpleTuner reads it (algo lokr or loha)
    musubi_blocks_to_swap: int = Field(0, ge=0)  # > 0: group offload (rules.simpletuner_meanings)
    ramtorch: bool = False  # refused when true: see rules.check_added_features
    validation_using_datasets: bool | None = None  # i2v: also validate on training samples' first frames
    eval_dataset_id: str | list[str] | None = None  # which datasets those come from (default: all)
    num_eval_images: int = Field(4, ge=1)  # samples per dataset
    allow_unsupported_keys: bool = False
    train_on_cache_as_is: bool = False  # train although clips or captions changed since `hvtune cache` (announced)

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _default_targets(cls, value: Any) -> Any:
        return "simpletuner" if value is None else value  # null: the default set

    @property
    def train_steps_limit(self) -> int | None:
        """SimpleTuner: max_train_steps 0 means "use num_train_epochs"."""
        return self.max_train_steps or None

    @property
    def flavour(self) -> FlavourSpec:
        return FLAVOURS[self.model_flavour]

    @property
    def shift(self) -> float:
        """SimpleTuner's apply_flow_schedule_shift: flow_schedule_shift when > 0; else 0 (= computed per batch by
        objective.auto_shift) with flow_schedule_auto_shift, else 1.0 (no shift)."""
        if self.flow_schedule_shift > 0:
            return self.flow_schedule_shift
        return 0.0 if self.flow_schedule_auto_shift else 1.0

    @property
    def timestep_mode(self) -> str:
        """SimpleTuner's order (helpers/models/common.py): uniform, then beta, else sigmoid(scale * N(0, 1))."""
        if self.flow_use_uniform_schedule:
            return "uniform"
        return "beta" if self.flow_use_beta_schedule else self.timestep_sampling

    @property
    def validation_size(self) -> tuple[int, int]:
        if self.validation_resolution is None:
            return self.flavour.resolution
        return parse_wxh(self.validation_resolution)


_WXH = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_wxh(text: str) -> tuple[int, int]:
    m = _WXH.match(text)
    if not m:
        raise ValueError(f"expected WIDTHxHEIGHT such as 848x480, got {text!r}")
    return int(m.group(1)), int(m.group(2))
