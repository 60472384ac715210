"""What a complete local copy of each model component holds, in the diffusers layout (one subfolder per component;
which components a flavour needs is `hvtune.flavours`).

Both the registry (any local root) and `encoder_layouts` (an encoder root that turns out not to be in Tencent's layout)
check completeness against this before anything heavy loads, so a bad mount fails in a second with the missing files
named, not halfway through a load.
"""

from __future__ import annotations

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


def missing_files(root: Path, components: tuple[str, ...] | list[str]) -> list[str]:
    """Relative paths that a complete local copy of `components` would have and `root` lacks."""
    missing = []
    for name in components:
        every, one_of = REQUIRED_FILES[name]
        missing += [f"{name}/{f}" for f in every if not (root / name / f).is_file()]
        if one_of and not any((root / name / f).is_file() for f in one_of):
            missing.append(f"{name}/{' or '.join(one_of)}")
    return missing
