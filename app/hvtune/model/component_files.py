"""What a complete local copy of each model component holds, in the diffusers layout (one subfolder per component;
which components a flavour needs is `hvtune.flavours`).

Both the registry (any local root) and `encoder_layouts` (an encoder root that turns out not to be in Tencent's layout)
check completeness against this before anything heavy loads, so a bad mount fails in a second with the missing files
named, not halfway through a load.
"""

from __future__ import annotations

import json
from pathlib import Path

_MODEL_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
# subfolder -> (files that must all exist, files of which at least one must exist)
REQUIRED_FILES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "transformer": (("config.json",), _MODEL_WEIGHTS),
    "vae": (("config.json",), _MODEL_WEIGHTS),
    "scheduler": (("scheduler_config.json",), ()),
    "text_encoder": (("config.json",), _HF_WEIGHTS),
    "tokenizer": (("tokenizer_config.json",), ()),
    "text_encoder_2": (("config.json",), _HF_WEIGHTS),
    "tokenizer_2": (("tokenizer_config.json",), ()),
    "image_encoder": (("config.json",), _HF_WEIGHTS),
    "feature_extractor": (("preprocessor_config.json",), ()),
}


def safetensors_damage(path: Path) -> str | None:
    """Why the safetensors file at `path` cannot be whole, from its header alone (no hashing): "missing", no readable
    header, or a length other than the header describes (a download or copy cut short). None when it looks whole."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or length > size - 8:
                return f"damaged: {size} bytes, no readable safetensors header"
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return f"damaged: {e}"
    if 8 + length + end != size:
        return f"damaged: {size} bytes, its header describes {8 + length + end}"
    return None


def _weight_problems(folder: Path, weights: tuple[str, ...]) -> list[str]:
    """The weight files of one component folder that are missing or cut short: the single file, or every shard its
    index lists, each named with its path."""
    single, index = (folder / w for w in weights)
    if single.is_file():
        damage = safetensors_damage(single)
        return [f"{single} ({damage})"] if damage else []
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{index} (unreadable: {e})"]
    problems = []
    for shard in shards:
        damage = safetensors_damage(folder / shard)
        if damage:
            problems.append(f"{folder / shard} ({damage}; listed in {index.name})")
    return problems


def missing_files(root: Path, components: tuple[str, ...] | list[str]) -> list[str]:
    """What a complete local copy of `components` would have and `root` lacks: relative paths of missing files, and
    the full path of each weight file (or shard its index lists) that is missing or cut short."""
    missing = []
    for name in components:
        every, one_of = REQUIRED_FILES[name]
        missing += [f"{name}/{f}" for f in every if not (root / name / f).is_file()]
        if one_of and not any((root / name / f).is_file() for f in one_of):
            missing.append(f"{name}/{' or '.join(one_of)}")
        elif one_of and one_of[0].endswith(".safetensors"):
            missing += _weight_problems(root / name, one_of)
    return missing
