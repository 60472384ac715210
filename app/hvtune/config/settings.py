"""Training and data-backend configuration with SimpleTuner's key names.

Values come in layers, later winning: built-in defaults, the config file, environment variables `HVTUNE_<KEY>`,
command-line flags `--key=value`. Every resolved value remembers where it came from (`ResolvedConfig.sources`), so
`hvtune check` can show it and the run record can store it. Keys we do not know (SimpleTuner configs carry hundreds)
are kept and reported once; they never change what runs.

Validation collects every problem before reporting: a user fixing a config wants the whole list, not one per run.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Task = Literal["t2v", "i2v"]
Flavour = Literal["t2v-480p", "t2v-720p", "i2v-480p", "i2v-720p"]
FLAVOURS: tuple[str, ...] = Flavour.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class FlavourDefaults:
    task: Task
    resolution: tuple[int, int]  # (width, height), multiples of 16
    flow_shift: float  # Tencent's inference shift (the pipeline's); training uses flow_schedule_shift (default 3.0)


FLAVOUR_DEFAULTS: dict[str, FlavourDefaults] = {
    "t2v-480p": FlavourDefaults("t2v", (848, 480), 5.0),
    "i2v-480p": FlavourDefaults("i2v", (848, 480), 5.0),
    "t2v-720p": FlavourDefaults("t2v", (1280, 720), 9.0),
    "i2v-720p": FlavourDefaults("i2v", (1280, 720), 7.0),
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @property
    def unknown_keys(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


CaptionStrategy = Literal["textfile", "filename", "instanceprompt", "metadata"]


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

    @property
    def skipped(self) -> bool:
        """SimpleTuner skips a dataset with either `disabled` or `disable` set (data_backend/factory.py)."""
        return self.disabled or self.disable


class TrainConfig(_Section):
    # model
    model_type: Literal["lora"] = "lora"
    model_family: Literal["hunyuanvideo"] = "hunyuanvideo"
    pretrained_model_name_or_path: str = "tencent/HunyuanVideo-1.5"
    revision: str | None = None
    model_flavour: str = "t2v-480p"
    text_encoder_path: str | None = None
    vision_encoder_path: str | None = None
    base_model_precision: str = "no_change"  # no_change, bf16, int8-torchao (others refused in _check_train_rules)
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
    # LoRA
    lora_rank: int = Field(16, ge=1)
    lora_alpha: float | None = None
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # SimpleTuner 0.1; see simpletuner.KEPT_DEFAULTS
    lora_init_type: Literal["default", "gaussian"] = "default"
    lora_target_modules: list[str] | None = None
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
    # memory
    gradient_checkpointing: bool = True
    enable_group_offload: bool = False
    group_offload_type: Literal["block_level", "leaf_level"] = "block_level"
    group_offload_blocks_per_group: int = Field(1, ge=1)
    group_offload_use_stream: bool = False
    enable_model_cpu_offload: bool = False
    vae_enable_patch_conv: bool = False
    vae_enable_tiling: bool = False
    vae_enable_slicing: bool = False
    # checkpoints, validation, logging
    checkpointing_steps: int = Field(500, ge=1, alias="checkpoint_step_interval")
    checkpoints_total_limit: int | None = Field(5, ge=1)
    resume_from_checkpoint: str | None = "latest"
    overwrite_output_dir: bool = False  # replace another run's outputs in output_dir instead of refusing to mix them
    validation_steps: int = Field(0, ge=0, alias="validation_step_interval")
    validation_disable: bool = False
    validation_prompt: str = "A cat walks across a sunlit kitchen floor."
    validation_negative_prompt: str = ""
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
    musubi_blocks_to_swap: int = Field(0, ge=0)  # refused when > 0: see _check_train_rules
    ramtorch: bool = False  # refused when true: see _check_train_rules
    validation_using_datasets: bool | None = None  # i2v: also validate on training samples' first frames
    eval_dataset_id: str | list[str] | None = None  # which datasets those come from (default: all)
    num_eval_images: int = Field(4, ge=1)  # samples per dataset
    allow_unsupported_keys: bool = False

    @property
    def train_steps_limit(self) -> int | None:
        """SimpleTuner: max_train_steps 0 means "use num_train_epochs"."""
        return self.max_train_steps or None

    @property
    def flavour(self) -> FlavourDefaults:
        return FLAVOUR_DEFAULTS[self.model_flavour]

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


# ----------------------------------------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    where: str  # a file path, an env var or a flag
    key: str
    value: Any
    rule: str

    def __str__(self) -> str:
        return f"{self.where}: {self.key} = {self.value!r}: {self.rule}"


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, wrong mount); the CLI prints it and exits 2.
    Every stage's user-facing errors derive from it."""

    exit_code = 2


class ConfigError(UserError):
    """One or more configuration problems; str() lists them all."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} configuration problem(s):\n{lines}")


# ---------------------------------------------------------------------------------------------------------- resolution


@dataclass
class ResolvedConfig:
    train: TrainConfig
    datasets: list[DatasetConfig]
    sources: dict[str, str]  # key -> "default" | "file:PATH" | "env:VAR" | "flag:--key"
    config_path: Path | None
    backend_path: Path | None
    notices: list[str] = field(default_factory=list)
    unknown: dict[str, Any] = field(default_factory=dict)  # unknown training keys, kept for the run record

    @property
    def task(self) -> Task:
        return self.train.flavour.task

    def to_record(self) -> dict[str, Any]:
        return {
            "config": mask_secrets(self.train.model_dump(mode="json", by_alias=False)),
            "datasets": [mask_secrets(d.model_dump(mode="json")) for d in self.datasets],
            "sources": self.sources,
            "unknown_keys": mask_secrets(self.unknown),
            "config_path": str(self.config_path) if self.config_path else None,
            "backend_path": str(self.backend_path) if self.backend_path else None,
        }


_SECRET_WORDS = {"token", "key", "apikey", "secret", "password", "passwd", "credential", "credentials", "webhook"}


def is_secret_key(key: str) -> bool:
    """A key that looks like it holds a secret (`hub_token`, `wandb_api_key`, `aws_secret_access_key`): one of its
    `_`/`-` separated words is a secret word. hvtune uses no such key itself; users paste them into configs."""
    return any(word in _SECRET_WORDS for word in re.split(r"[_\-.]", key.lower()))


# token-shaped strings under any key (a Hugging Face or OpenAI-style token pasted into a prompt or a path)
_SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,})\b")


def mask_secrets(values: Any) -> Any:
    """`values` with the value of every secret-looking key (at any depth), and every token-shaped string, replaced by
    "***": for every output (`hvtune check`, run.json, logs, the run page). Empty values stay visible: they show a
    secret is missing, not what it is."""
    if isinstance(values, dict):
        return {k: "***" if is_secret_key(str(k).lstrip("-")) and v else mask_secrets(v) for k, v in values.items()}
    if isinstance(values, list):
        return [mask_secrets(v) for v in values]
    if isinstance(values, str):
        return _SECRET_VALUE.sub("***", values)
    return values


_WXH = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_wxh(text: str) -> tuple[int, int]:
    m = _WXH.match(text)
    if not m:
        raise ValueError(f"expected WIDTHxHEIGHT such as 848x480, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def read_json(path: Path) -> Any:
    """Read JSON, turning syntax errors into a Problem with line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([Problem(str(path), "(file)", None, f"cannot read: {e.strerror}")]) from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        rule = f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        raise ConfigError([Problem(str(path), "(file)", None, rule)]) from e


def _parse_scalar(text: str) -> Any:
    """Env and flag values are strings; JSON gives numbers, booleans, null and lists their types."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_flags(argv: Sequence[str]) -> dict[str, str]:
    flags: dict[str, str] = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError([Problem("command line", arg, None, "config overrides are written --key=value")])
        key, value = arg[2:].split("=", 1)
        flags[key.replace("-", "_")] = value
    return flags


def _field_keys() -> dict[str, str]:
    """Every accepted spelling of a training key -> the field name (aliases included)."""
    keys = {}
    for name, info in TrainConfig.model_fields.items():
        keys[name] = name
        if info.alias:
            keys[info.alias] = name
    return keys


def _resolve_path(text: str, config_path: Path | None) -> Path:
    """Relative paths resolve against the working directory, like SimpleTuner, then beside the config file."""
    p = Path(text).expanduser()
    if p.is_absolute() or p.exists() or config_path is None:
        return p
    for base in (config_path.parent, config_path.parent.parent):
        if (base / p).exists():
            return base / p
    return p


def _layers(
    path: Path | None, env: Mapping[str, str], argv: Sequence[str]
) -> tuple[dict[str, Any], dict[str, str], dict[str, str], list[str]]:
    """Raw values by field name, layered file < env < flags, with each one's source, its place for error messages,
    and a notice for every file value that the environment replaces (a stale .env line must not win silently).
    An empty HVTUNE_<KEY> counts as unset: compose passes `KEY=` lines of an env file as empty strings."""
    keys = _field_keys()
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    where: dict[str, str] = {}
    notices: list[str] = []
    if path is not None:
        data = read_json(path)
        if not isinstance(data, dict):
            raise ConfigError([Problem(str(path), "(file)", type(data).__name__, "must be a JSON object")])
        for key, value in data.items():
            name = keys.get(key, key)
            raw[name] = value
            sources[name] = f"file:{path}"
            where[name] = str(path)
    for key, name in keys.items():
        var = f"HVTUNE_{key.upper()}"
        if env.get(var, "") != "":
            value = _parse_scalar(env[var])
            if sources.get(name, "").startswith("file:") and raw[name] != value:
                notices.append(f"{name}: {var}={env[var]} (environment, e.g. .env) overrides {raw[name]!r} from {path}")
            raw[name] = value
            sources[name] = f"env:{var}"
            where[name] = var
    for key, value in _parse_flags(argv).items():
        name = keys.get(key, key)
        raw[name] = _parse_scalar(value)
        sources[name] = f"flag:--{key}"
        where[name] = f"flag --{key}"
    return raw, sources, where, notices


def resolve_keys(
    config_path: str | Path | None, names: Sequence[str], *, env: Mapping[str, str] | None = None
) -> list[tuple[str, Any, str]]:
    """(key, value, source) of training keys through the same layers as load_config, without checking the rest of
    the config or the datasets: the container entrypoints ask for the few folders they must check before any work."""
    path = Path(config_path) if config_path else None
    raw, sources, where, _ = _layers(path, os.environ if env is None else env, ())
    keys = _field_keys()
    unknown = [n for n in names if n not in keys]
    if unknown:
        known = ", ".join(sorted(TrainConfig.model_fields))
        raise ConfigError([Problem("command line", n, None, f"not a training key; one of {known}") for n in unknown])
    fields = [keys[n] for n in names]
    problems: list[Problem] = []
    train = _validate_section(
        TrainConfig, {f: raw[f] for f in fields if f in raw}, lambda k: where.get(k, "defaults"), problems
    )
    if problems:
        raise ConfigError(problems)
    return [(name, getattr(train, f), sources.get(f, "default")) for name, f in zip(names, fields, strict=True)]


def load_config(
    config_path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    argv: Sequence[str] = (),
    check_paths: bool = True,
) -> ResolvedConfig:
    path = Path(config_path) if config_path else None
    problems: list[Problem] = []
    raw, sources, where, notices = _layers(path, os.environ if env is None else env, argv)

    train = _validate_section(TrainConfig, raw, lambda k: where.get(k, "defaults"), problems)
    for name in TrainConfig.model_fields:
        sources.setdefault(name, "default")
    unknown = {k: v for k, v in raw.items() if k not in TrainConfig.model_fields}
    _report_unknown_keys(unknown, train.allow_unsupported_keys, lambda k: where.get(k, "config"), problems, notices)
    _resolve_seed(train, sources, notices)

    _check_train_rules(train, lambda k: where.get(k, "defaults"), problems, notices)
    flavour = train.flavour
    if train.validation_resolution is None:
        train.validation_resolution = "{}x{}".format(*flavour.resolution)
        sources["validation_resolution"] = f"default for {train.model_flavour}"

    backend_path = None
    datasets: list[DatasetConfig] = []
    if train.data_backend_config:
        backend_path = _resolve_path(train.data_backend_config, path)
        try:
            datasets = _load_backends(backend_path, problems, notices, train.allow_unsupported_keys)
        except ConfigError as e:
            problems.extend(e.problems)
    elif train.instance_data_dir:
        datasets = _default_backends(train)
    else:
        problems.append(
            Problem(
                "config",
                "data_backend_config",
                None,
                "set data_backend_config (a multidatabackend.json) or instance_data_dir",
            )
        )
    if datasets:
        _dataset_defaults_from_config(datasets, train)
        _check_dataset_rules(datasets, str(backend_path or "instance_data_dir"), problems, check_paths, path)
        _check_dataset_simpletuner(datasets, train, str(backend_path or "instance_data_dir"), problems, notices)
    _check_added_features(train, datasets, lambda k: where.get(k, "defaults"), problems, path)

    if problems:
        raise ConfigError(problems)
    return ResolvedConfig(train, datasets, sources, path, backend_path, notices, unknown)


def _validate_section(model: type, raw: dict[str, Any], where, problems: list[Problem]):
    """Validate; on failure record every error, drop the offending keys and validate again, so the cross-field
    rules still run on what is valid and the user sees every problem in one go."""
    raw = dict(raw)
    for _ in range(3):
        try:
            return model.model_validate(raw)
        except ValidationError as e:
            for err in e.errors():
                key = ".".join(str(p) for p in err["loc"]) or "(object)"
                top = str(err["loc"][0]) if err["loc"] else ""
                problems.append(Problem(where(top), key, err.get("input"), err["msg"]))
                raw.pop(top, None)
    return model.model_validate({})


def _report_unknown_keys(unknown: dict[str, Any], allow: bool, where, problems: list[Problem], notices: list[str]):
    """Keys hvtune has no field for, grouped as simpletuner.classify_unknown says: refused ones are errors (they
    change training in SimpleTuner) unless allow_unsupported_keys; the others are one notice per group."""
    from hvtune.config.simpletuner import classify_unknown

    groups: dict[str, list[str]] = {"ignored": [], "unknown": [], "allowed": []}
    for key in sorted(unknown):
        group, reason = classify_unknown(key, unknown[key])
        if group == "refused" and not allow:
            problems.append(
                Problem(
                    where(key),
                    key,
                    unknown[key],
                    f"changes training in SimpleTuner and hvtune does not do it: {reason}. "
                    "Remove it, or set allow_unsupported_keys: true to train without it",
                )
            )
        else:
            groups["allowed" if group == "refused" else group].append(f"{key} ({reason})")
    labels = {
        "ignored": "ignored, no effect on the LoRA",
        "unknown": "unknown, ignored",
        "allowed": "NOT applied although they change training in SimpleTuner (allow_unsupported_keys)",
    }
    for group, entries in groups.items():
        if entries:
            notices.append(f"{labels[group]} ({len(entries)}): " + "; ".join(entries))


def _resolve_seed(t: TrainConfig, sources: dict[str, str], notices: list[str]) -> None:
    """SimpleTuner (helpers/configuration/cmd_args.py): seed 0 = the current time, -1 = a random seed."""
    if t.seed not in (0, -1):
        return
    import random
    import time

    asked = t.seed
    t.seed = int(time.time()) if asked == 0 else random.randint(0, 2**30)
    sources["seed"] += f" ({asked} -> drawn)"
    notices.append(f"seed {asked}: drew seed {t.seed} (recorded in run.json; pass --seed={t.seed} to repeat)")


def _round16(value: int, key: str, notices: list[str]) -> int:
    rounded = value // 16 * 16
    if rounded != value:
        notices.append(f"{key}: {value} rounded down to {rounded} (the model needs multiples of 16)")
    return rounded


def _check_frames(n: int | None, where: str, key: str, problems: list[Problem]) -> None:
    if n is not None and (n < 1 or (n - 1) % 4 != 0):
        problems.append(Problem(where, key, n, "(frames - 1) % 4 must be 0, e.g. 1, 33, 61, 121, 129"))


def _check_train_rules(t: TrainConfig, where, problems: list[Problem], notices: list[str]) -> None:
    if t.model_flavour not in FLAVOUR_DEFAULTS:
        problems.append(
            Problem(where("model_flavour"), "model_flavour", t.model_flavour, f"must be one of {', '.join(FLAVOURS)}")
        )
        t.model_flavour = "t2v-480p"
    _check_frames(
        t.validation_num_video_frames, where("validation_num_video_frames"), "validation_num_video_frames", problems
    )
    if isinstance(t.validation_resolution, list) or (
        isinstance(t.validation_resolution, str) and "," in t.validation_resolution
    ):
        entries = (
            t.validation_resolution
            if isinstance(t.validation_resolution, list)
            else [e.strip() for e in t.validation_resolution.split(",")]
        )
        if len(entries) > 1:
            notices.append(f"validation_resolution: validating at {entries[0]} only (of {entries})")
        t.validation_resolution = entries[0] if entries else None
    if isinstance(t.validation_resolution, int) or (
        isinstance(t.validation_resolution, str) and t.validation_resolution.strip().isdigit()
    ):
        t.validation_resolution = f"{int(t.validation_resolution)}x{int(t.validation_resolution)}"
    if t.validation_resolution is not None:
        try:
            w, h = parse_wxh(t.validation_resolution)
            w, h = (
                _round16(w, "validation_resolution width", notices),
                _round16(h, "validation_resolution height", notices),
            )
            if min(w, h) < 16:
                raise ValueError("width and height must be at least 16")
            t.validation_resolution = f"{w}x{h}"
        except ValueError as e:
            problems.append(
                Problem(where("validation_resolution"), "validation_resolution", t.validation_resolution, str(e))
            )
    if t.base_model_precision not in ("no_change", "bf16", "int8-torchao"):
        problems.append(
            Problem(
                where("base_model_precision"),
                "base_model_precision",
                t.base_model_precision,
                "hvtune quantises with torchao int8 only: use int8-torchao (nearest), bf16 or no_change",
            )
        )
    if t.validation_prompt_library:
        problems.append(
            Problem(
                where("validation_prompt_library"),
                "validation_prompt_library",
                True,
                "SimpleTuner's built-in prompt library is not available: validation uses validation_prompt; set false",
            )
        )
    if not t.train_steps_limit and t.num_train_epochs == 0:
        problems.append(
            Problem(where("num_train_epochs"), "num_train_epochs", 0, "0 means 'use max_train_steps': set one of them")
        )
    if t.aspect_bucket_alignment % 16:
        problems.append(
            Problem(
                where("aspect_bucket_alignment"),
                "aspect_bucket_alignment",
                t.aspect_bucket_alignment,
                "HunyuanVideo 1.5 needs multiples of 16: use 16, 32 or 64",
            )
        )
    if t.lr_scheduler == "constant" and t.lr_warmup_steps > 0:
        notices.append("lr_scheduler constant ignores lr_warmup_steps, as in SimpleTuner: use constant_with_warmup")
    from hvtune.config.simpletuner import optimizer_problem, scheduler_problem

    for key, rule in (
        ("optimizer", optimizer_problem(t.optimizer)),
        ("lr_scheduler", scheduler_problem(t.lr_scheduler, t.lr_warmup_steps)),
    ):
        if rule:
            problems.append(Problem(where(key), key, getattr(t, key), rule))
    if t.group_offload_use_stream and t.enable_model_cpu_offload:
        problems.append(
            Problem(
                where("group_offload_use_stream"),
                "group_offload_use_stream",
                True,
                "never combine with enable_model_cpu_offload; choose one offload method",
            )
        )
    if t.group_offload_use_stream and not t.enable_group_offload:
        problems.append(
            Problem(
                where("group_offload_use_stream"),
                "group_offload_use_stream",
                True,
                "only applies with enable_group_offload: true; enable group offload or drop the flag",
            )
        )
    if t.enable_group_offload and t.enable_model_cpu_offload:
        problems.append(
            Problem(
                where("enable_model_cpu_offload"),
                "enable_model_cpu_offload",
                True,
                "never combine with enable_group_offload; choose one offload method",
            )
        )


def _check_added_features(
    t: TrainConfig, datasets: list[DatasetConfig], where, problems: list[Problem], config_path: Path | None
) -> None:
    """lora_type lycoris needs a readable lycoris_config (resolved like data paths); block-swap options are refused
    with the setting that does the same job here; validation_using_datasets needs i2v and known eval_dataset_id."""
    from hvtune.config.lycoris import read_lycoris_config

    if t.lora_type == "lycoris":
        text = t.lycoris_config or "config/lycoris_config.json"  # SimpleTuner's default
        path = _resolve_path(text, config_path)
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
    offload = "enable_group_offload: true with group_offload_type: block_level (all blocks, 1 per group)"
    if t.musubi_blocks_to_swap > 0:
        rule = f"hvtune cannot keep some blocks resident and swap the rest; use {offload} and set this to 0"
        problems.append(Problem(where("musubi_blocks_to_swap"), "musubi_blocks_to_swap", t.musubi_blocks_to_swap, rule))
    if t.ramtorch:
        rule = "RamTorch is not included; use enable_group_offload: true with group_offload_type: leaf_level"
        problems.append(Problem(where("ramtorch"), "ramtorch", True, rule))
    if t.validation_using_datasets and t.model_flavour in FLAVOUR_DEFAULTS and t.flavour.task != "i2v":
        rule = "needs an i2v model_flavour (HunyuanVideo 1.5 t2v has no image input to take from the dataset)"
        problems.append(Problem(where("validation_using_datasets"), "validation_using_datasets", True, rule))
    wanted = [t.eval_dataset_id] if isinstance(t.eval_dataset_id, str) else t.eval_dataset_id or []
    known = [d.id for d in datasets if d.dataset_type in ("video", "image") and not d.disabled]
    unknown = [i for i in wanted if i not in known]
    if unknown and datasets:
        rule = f"no enabled video or image dataset with that id (known: {', '.join(known)})"
        problems.append(Problem(where("eval_dataset_id"), "eval_dataset_id", unknown, rule))


def check_device_support(t: TrainConfig, device: str, where: str = "config") -> list[Problem]:
    """Rules that depend on the machine: `device` is "cuda", "rocm" or "cpu" (see registry.detect_device)."""
    problems = []
    if t.group_offload_use_stream and device != "cuda":
        problems.append(
            Problem(
                where,
                "group_offload_use_stream",
                True,
                f"needs an NVIDIA CUDA GPU (this machine: {device}); set it to false",
            )
        )
    return problems


def _default_backends(t: TrainConfig) -> list[DatasetConfig]:
    """No multidatabackend.json: one video dataset from instance_data_dir plus the text-embed cache. This dataset is
    hvtune's (SimpleTuner has no such path): its captions are the .txt files beside the clips unless the config's
    caption_strategy says otherwise."""
    strategy = t.caption_strategy if "caption_strategy" in t.model_fields_set else "textfile"
    return [
        DatasetConfig(
            id="videos", dataset_type="video", instance_data_dir=t.instance_data_dir, caption_strategy=strategy
        ),
        DatasetConfig(id="text-embeds", dataset_type="text_embeds", default=True),
    ]


def _load_backends(path: Path, problems: list[Problem], notices: list[str], allow: bool) -> list[DatasetConfig]:
    data = read_json(path)
    if not isinstance(data, list):
        raise ConfigError([Problem(str(path), "(file)", type(data).__name__, "must be a JSON list of datasets")])
    datasets = []
    for i, entry in enumerate(data):
        label = f"[{i}]" + (f" id={entry.get('id')}" if isinstance(entry, dict) and entry.get("id") else "")
        if not isinstance(entry, dict):
            problems.append(Problem(str(path), label, entry, "each dataset must be a JSON object"))
            continue
        problems_local: list[Problem] = []
        ds = _validate_section(DatasetConfig, entry, lambda _k: str(path), problems_local)
        for p in problems_local:
            problems.append(Problem(p.where, f"{label}.{p.key}", p.value, p.rule))
        if "id" not in entry:
            continue
        if isinstance(ds.resolution, str):
            try:
                w, h = parse_wxh(ds.resolution)
                ds.resolution = (
                    f"{_round16(w, f'{label}.resolution', notices)}x{_round16(h, f'{label}.resolution', notices)}"
                )
            except ValueError as e:
                problems.append(Problem(str(path), f"{label}.resolution", ds.resolution, str(e)))
        elif isinstance(ds.resolution, int):
            ds.resolution = _round16(ds.resolution, f"{label}.resolution", notices)
        _report_dataset_keys(path, label, ds, allow, problems, notices)
        datasets.append(ds)
    return datasets


def _report_dataset_keys(path, label, ds: DatasetConfig, allow: bool, problems, notices) -> None:
    """Dataset and video keys hvtune has no field for: SimpleTuner's harmless ones are a notice; anything else would
    change what is trained (or is a typo of a key that does), so it is an error unless allow_unsupported_keys."""
    from hvtune.config.simpletuner import DATASET_KEYS

    found = [(k, v, DATASET_KEYS.get(k)) for k, v in ds.unknown_keys.items()]
    found += [(f"video.{k}", v, None) for k, v in ds.video.unknown_keys.items()]
    ignored = []
    for key, value, policy in sorted(found, key=lambda t: t[0]):
        if policy is not None and policy.status == "ignored":
            ignored.append(f"{key} ({policy.note})")
            continue
        reason = policy.note if policy is not None else "not a key hvtune or SimpleTuner 4.10.1 reads here (a typo?)"
        if allow:
            notices.append(f"{path} {label}: {key} NOT applied ({reason}; allow_unsupported_keys)")
        else:
            problems.append(
                Problem(
                    str(path),
                    f"{label}.{key}",
                    value,
                    f"{reason}. Remove it, or set allow_unsupported_keys: true to train without it",
                )
            )
    if ignored:
        notices.append(f"{path} {label}: ignored, no effect on the LoRA: " + "; ".join(ignored))


def _dataset_defaults_from_config(datasets: list[DatasetConfig], t: TrainConfig) -> None:
    """SimpleTuner's data_backend/factory.py: a dataset without instance_prompt / prepend_instance_prompt takes the
    top-level one; only_instance_prompt applies when either sets it."""
    for ds in datasets:
        if "caption_strategy" not in ds.model_fields_set and "caption_strategy" in t.model_fields_set:
            ds.caption_strategy = t.caption_strategy
        if "instance_prompt" not in ds.model_fields_set and t.instance_prompt is not None:
            ds.instance_prompt = t.instance_prompt
        if "prepend_instance_prompt" not in ds.model_fields_set:
            ds.prepend_instance_prompt = t.prepend_instance_prompt
        ds.only_instance_prompt = ds.only_instance_prompt or t.only_instance_prompt


def _check_dataset_simpletuner(
    datasets: list[DatasetConfig], t: TrainConfig, where: str, problems: list[Problem], notices: list[str]
) -> None:
    """Dataset settings whose SimpleTuner meaning needs the top-level config too."""
    for i, ds in enumerate(datasets):
        if ds.skipped or ds.dataset_type not in ("video", "image"):
            continue
        label = f"[{i}] id={ds.id}"
        maximum = ds.maximum_image_size if ds.maximum_image_size is not None else t.maximum_image_size
        downsample = ds.target_downsample_size if ds.target_downsample_size is not None else t.target_downsample_size
        if ds.crop and maximum and downsample:  # SimpleTuner: TrainingSample._should_resize_before_crop
            problems.append(
                Problem(
                    where,
                    f"{label}.target_downsample_size",
                    downsample,
                    "with crop and maximum_image_size, SimpleTuner downsamples to it before cropping (a wider view); "
                    "hvtune does not: drop maximum_image_size/target_downsample_size or crop",
                )
            )
        if "caption_strategy" not in ds.model_fields_set and "caption_strategy" not in t.model_fields_set:
            notices.append(
                f"{where} {label}: caption_strategy not set: SimpleTuner's default, filename (captions from file "
                "names); set textfile to read the .txt beside each file"
            )


def _check_dataset_rules(
    datasets: list[DatasetConfig], where: str, problems: list[Problem], check_paths: bool, config_path: Path | None
) -> None:
    seen: set[str] = set()
    defaults = []
    for i, ds in enumerate(datasets):
        label = f"[{i}] id={ds.id}"
        if ds.id in seen:
            problems.append(Problem(where, f"{label}.id", ds.id, "dataset ids must be unique"))
        seen.add(ds.id)
        if ds.skipped:
            continue
        if ds.type != "local":
            problems.append(Problem(where, f"{label}.type", ds.type, "only 'local' datasets are supported"))
        if ds.dataset_type == "text_embeds":
            if ds.default:
                defaults.append(ds.id)
            continue
        if ds.dataset_type not in ("video", "image"):
            problems.append(
                Problem(where, f"{label}.dataset_type", ds.dataset_type, "must be video, image or text_embeds")
            )
            continue
        v = ds.video
        _check_frames(v.num_frames, where, f"{label}.video.num_frames", problems)
        if v.bucket_strategy not in ("aspect_ratio", "resolution_frames"):
            problems.append(
                Problem(
                    where,
                    f"{label}.video.bucket_strategy",
                    v.bucket_strategy,
                    "must be aspect_ratio or resolution_frames",
                )
            )
        if v.frame_interval < 1:
            problems.append(Problem(where, f"{label}.video.frame_interval", v.frame_interval, "must be >= 1"))
        if v.min_frames is not None and v.min_frames > v.num_frames:
            problems.append(
                Problem(where, f"{label}.video.min_frames", v.min_frames, f"must be <= num_frames ({v.num_frames})")
            )
        if v.max_frames is not None and v.max_frames < v.num_frames:
            problems.append(
                Problem(where, f"{label}.video.max_frames", v.max_frames, f"must be >= num_frames ({v.num_frames})")
            )
        if ds.crop and ds.crop_style not in ("center", "centre"):
            problems.append(
                Problem(
                    where,
                    f"{label}.crop_style",
                    ds.crop_style,
                    "hvtune crops the centre (random, corner and face crops are not implemented): use center",
                )
            )
        if ds.crop and ds.crop_aspect in ("random", "closest"):
            problems.append(
                Problem(where, f"{label}.crop_aspect", ds.crop_aspect, "not implemented: use square or preserve")
            )
        if ds.caption_strategy == "instanceprompt" and not ds.instance_prompt:
            problems.append(
                Problem(where, f"{label}.instance_prompt", None, "caption_strategy instanceprompt needs it")
            )
        if ds.caption_strategy == "metadata" and not ds.metadata_file:
            problems.append(
                Problem(where, f"{label}.metadata_file", None, "caption_strategy metadata needs a jsonl or csv")
            )
        if not ds.instance_data_dir:
            problems.append(Problem(where, f"{label}.instance_data_dir", None, "a video or image dataset needs it"))
        elif check_paths:
            data_dir = _resolve_path(ds.instance_data_dir, config_path)
            if not data_dir.is_dir():
                problems.append(
                    Problem(
                        where,
                        f"{label}.instance_data_dir",
                        ds.instance_data_dir,
                        f"directory not found (looked for {data_dir.absolute()})",
                    )
                )
            else:
                ds.instance_data_dir = str(data_dir)
    if len(defaults) != 1:
        problems.append(
            Problem(
                where,
                "text_embeds",
                defaults or None,
                'exactly one enabled text_embeds dataset must have "default": true',
            )
        )
