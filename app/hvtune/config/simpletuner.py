"""SimpleTuner 4.10.1's options beyond the key tables (`hvtune.config.simpletuner_keys`): its defaults, the verdict
on a key hvtune has no field for, its optimizer and lr_scheduler names, the defaults hvtune keeps different on purpose,
and docs/SIMPLETUNER.md rendered from all of them.

SimpleTuner's defaults come from `simpletuner_options.json`, generated from the wheel's field registry by
benchmarks/simpletuner_options.py.
"""

from __future__ import annotations

import json
from contextlib import suppress
from functools import cache
from pathlib import Path
from typing import Any

from hvtune.config.simpletuner_keys import (
    DATASET_KEYS,
    FEATURE_KEYS,
    TRAIN_KEYS,
    VERSION,
    VIDEO_KEYS,
    KeyPolicy,
)


@cache
def _options() -> dict[str, Any]:
    return json.loads((Path(__file__).with_name("simpletuner_options.json")).read_text(encoding="utf-8"))


@cache
def simpletuner_defaults() -> dict[str, Any]:
    """Every SimpleTuner 4.10.1 option -> its default (the field registry; see simpletuner_options.json)."""
    return {name: entry["default"] for name, entry in _options()["options"].items()}


def simpletuner_optimizers() -> list[str]:
    """Every optimizer name SimpleTuner 4.10.1 accepts (helpers/training/optimizer_param.py optimizer_choices)."""
    return _options()["optimizers"]


@cache
def example_results() -> dict[str, dict[str, str]]:
    """{SimpleTuner example config: {key `hvtune check` refuses: why}} ({}: it passes), written by
    benchmarks/simpletuner_examples.py from the wheel; tests/test_simpletuner_parity.py reruns it."""
    path = Path(__file__).with_name("simpletuner_examples.json")
    return json.loads(path.read_text(encoding="utf-8"))


def simpletuner_dataset_keys() -> list[str]:
    """Every key SimpleTuner 4.10.1 reads from a dataset entry of multidatabackend.json."""
    return _options()["dataset_keys"]


def train_policy(key: str) -> KeyPolicy | None:
    return TRAIN_KEYS.get(key) or FEATURE_KEYS.get(key)


def is_simpletuner_default(key: str, value: Any) -> bool:
    defaults = simpletuner_defaults()
    if key not in defaults:
        return False
    default = defaults[key]
    return value == default or (default in (None, "") and value in ("", False, 0, None))


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
# sine are SimpleTuner's own classes, whose period is lr_warmup_steps (train.optim.build_lr_scheduler restates them).
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "polynomial", "cosine", "cosine_with_restarts", "sine")
SCHEDULER_ALIASES = {"cosine_with_warmup": "cosine"}  # helpers/configuration/cli_utils.py normalize_lr_scheduler_value
NEEDS_WARMUP_PERIOD = ("cosine_with_restarts", "sine")  # SimpleTuner raises for T_0 = lr_warmup_steps = 0


def nearest_optimizer(name: str) -> str:
    """The optimizer hvtune offers that is closest to SimpleTuner's `name`: the table above, else by family (an 8-bit
    one -> bnb-adamw8bit, an Adam without decoupled decay -> torch-adam), else SimpleTuner's default adamw_bf16."""
    if name in NEAREST_OPTIMIZER:
        return NEAREST_OPTIMIZER[name]
    if any(part in name for part in ("8bit", "4bit", "fp8")):
        return "bnb-adamw8bit"
    if name.startswith("torch-") and "adam" in name:
        return "torch-adam"
    return "adamw_bf16"


def optimizer_problem(name: str) -> str | None:
    if name in OPTIMIZERS:
        return None
    if name in NEAREST_OPTIMIZER or name in simpletuner_optimizers():
        return f"a SimpleTuner optimizer hvtune does not offer; the nearest it offers is {nearest_optimizer(name)}"
    return f"not a SimpleTuner 4.10.1 optimizer; one of {', '.join(OPTIMIZERS)}"


def simpletuner_scheduler(name: str, warmup_steps: int) -> str:
    """The schedule SimpleTuner actually runs for `lr_scheduler: name` (cli_utils.normalize_lr_scheduler_value, applied
    to the parsed args in cmd_args.py): `cosine_with_warmup` is `cosine`, and `constant` with lr_warmup_steps > 0 is
    `constant_with_warmup` (diffusers' plain constant would skip the warmup)."""
    name = name.strip().lower()
    if name in SCHEDULER_ALIASES:
        return SCHEDULER_ALIASES[name]
    return "constant_with_warmup" if name == "constant" and warmup_steps > 0 else name


def scheduler_problem(name: str, warmup_steps: int) -> str | None:
    name = simpletuner_scheduler(name, warmup_steps)
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
    "vae_enable_tiling": "unset: the validation decode tiles (diffusers' 256 px tiles, seams blended), so a 480p x 61 "
    "frame decode needs ~7 GiB instead of ~71 GiB; the cache still encodes untiled (SimpleTuner's false)",
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
    others = [n for n in simpletuner_optimizers() if n not in OPTIMIZERS and n not in NEAREST_OPTIMIZER]
    lines.extend(f"| `{name}` | refused: nearest `{nearest_optimizer(name)}` | |" for name in others)
    lines.extend(["", "## Defaults kept different on purpose", "", "| key | why |", "|---|---|"])
    lines.extend(f"| `{k}` | {v} |" for k, v in KEPT_DEFAULTS.items())
    lines.append("")
    lines.extend(_examples_markdown())
    return "\n".join(lines)


def _examples_markdown() -> list[str]:
    results = example_results()
    passing = [name for name, refused in results.items() if not refused]
    lines = [
        "## SimpleTuner's example configs",
        "",
        f"`benchmarks/simpletuner_examples.py` runs `hvtune check` over the {len(results)} example configs of",
        f"SimpleTuner {VERSION} (`simpletuner/examples/*/config.json`; one more is not valid JSON), each switched to",
        "HunyuanVideo 1.5 (model_family hunyuanvideo, model_flavour t2v-480p, hvtune's hub id) with one local video",
        f"dataset. **{len(passing)} pass**: {', '.join(f'`{n}`' for n in passing)}.",
        "",
        "| example | refused keys |",
        "|---|---|",
    ]
    lines.extend(f"| `{n}` | {', '.join(f'`{k}`' for k in refused)} |" for n, refused in results.items() if refused)
    reasons: dict[tuple[str, str], int] = {}
    for refused in results.values():
        for key, why in refused.items():
            reasons[(key, why)] = reasons.get((key, why), 0) + 1
    lines.extend(["", "Why each key is refused (as `hvtune check` says it):", "", "| key | examples | why |"])
    lines.append("|---|---|---|")
    lines.extend(f"| `{k}` | {n} | {why.replace('|', '/')} |" for (k, why), n in sorted(reasons.items()))
    lines.append("")
    return lines


if __name__ == "__main__":  # regenerate the docs: python -m hvtune.config.simpletuner > docs/SIMPLETUNER.md
    print(render_markdown(), end="")
