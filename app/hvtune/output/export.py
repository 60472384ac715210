"""LoRA files: diffusers format (loads with `transformer.load_lora_adapter`) and ComfyUI format. docs/LORA_FORMATS.md
describes both for users.

Stored dtype: float32, as trained. A rank-16 LoRA on the default targets is ~110 MB in fp32 (~55 MB in bf16); keeping
fp32 makes the file an exact copy of the trained weights (a resumed run can be checked byte for byte, and bf16 would
round the small lora_B values). Loaders cast to the model's dtype when they apply it.

Diffusers: `pytorch_lora_weights.safetensors`, keys `transformer.<module>.lora_A.weight` / `.lora_B.weight` as written
by `HunyuanVideoLoraLoaderMixin.save_lora_weights` (diffusers 0.42.1 has no `load_lora_weights` on the HunyuanVideo
1.5 pipelines; `pipe.transformer.load_lora_adapter(dir, prefix="transformer", use_safetensors=True)` loads it). The
peft adapter config (rank, alpha, targets) is in the metadata key `lora_adapter_metadata`, which `load_lora_adapter`
reads, so alpha != rank loads at the trained strength; hvtune adds `hvtune.rank`, `hvtune.alpha`,
`hvtune.target_modules`.

ComfyUI: the names, fusing and LyCORIS layout are output/comfyui.py's (`to_comfyui`).

LyCORIS (`lora_type: lycoris`, peft LoKr/LoHa layers): the diffusers-format file holds peft's names
(`transformer.<module>.lokr_w1`, `.hada_w1_a`, ...) and the spec in the metadata key `hvtune.config.lycoris`;
`load_lycoris(transformer, path)` rebuilds the adapter from it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from hvtune.files import write_bytes_atomic
from hvtune.output.comfyui import to_comfyui
from hvtune.run_files import RunFiles
from hvtune.train.lora import lora_alpha

COMFYUI_FORMAT = "comfyui-hunyuanvideo15"


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft/diffusers module names (no prefix, no adapter name), float32, on the CPU."""
    from peft.utils import get_peft_model_state_dict

    model = getattr(transformer, "module", transformer)  # DDP-wrapped or not
    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def adapter_config(transformer) -> dict:
    """The LoRA config (rank, alpha, targets) that diffusers stores in the file so `load_lora_adapter` rebuilds the
    same adapter at the same scale. `target_modules` becomes the sorted list of the modules that really carry the
    adapter (the training config's regex minus `exclude_modules`), so a loader neither needs the exclusions nor warns
    that they excluded nothing."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = getattr(transformer, "module", transformer)
    config = model.peft_config["default"].to_dict()
    adapted = sorted(
        name
        for name, m in model.named_modules()
        if isinstance(m, BaseTunerLayer) and "default" in getattr(m, "scaling", {})
    )
    config["target_modules"] = adapted
    config["exclude_modules"] = None
    return config


def canonical_safetensors(data: bytes) -> bytes:
    """safetensors writes `__metadata__` from a Rust HashMap, so its key order (and the file's bytes) changes from
    process to process. Sort it: the same weights and metadata then give the same bytes, which is what lets a resumed
    run be checked against an uninterrupted one byte for byte. The header keeps its length, so offsets stay valid."""
    import struct

    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    if len(header.get("__metadata__") or {}) < 2:
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > length:
        return data
    return data[:8] + text.ljust(length, b" ") + data[8 + length :]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """`tensors` as canonical safetensors bytes, written atomically to `path` (see `files`)."""
    from safetensors.torch import save

    write_bytes_atomic(path, canonical_safetensors(save(tensors, metadata=metadata)))
    return path


def rank_alpha_metadata(rank: object, alpha: object) -> dict[str, str]:
    """hvtune's `hvtune.rank` and `hvtune.alpha` file metadata: the one place that writes them. The values are written
    as `str()` gives them (rank 16 -> "16", alpha 8.0 -> "8.0"), so pass them as the config or peft holds them."""
    return {"hvtune.rank": str(rank), "hvtune.alpha": str(alpha)}


def _config_metadata(config: dict | None) -> dict[str, str]:
    if not config:
        return {}
    targets = config.get("target_modules")
    if isinstance(targets, (set, frozenset, list, tuple)):
        targets = json.dumps(sorted(targets))
    return {**rank_alpha_metadata(config.get("r"), config.get("lora_alpha")), "hvtune.target_modules": str(targets)}


def save_diffusers_lora(
    state_dict: dict[str, torch.Tensor], out_dir: Path, metadata: dict[str, str], config: dict | None = None
) -> Path:
    """`out_dir/pytorch_lora_weights.safetensors`, keys prefixed `transformer.` exactly as the diffusers LoRA mixin
    writes them, with the adapter config (`config`, from `adapter_config`) in the metadata (without it a loader assumes
    alpha = rank) plus `metadata` and hvtune's rank/alpha/targets. The mixin's own write is not atomic, so it writes
    into a temp dir and the result is renamed into place."""
    from diffusers.loaders import HunyuanVideoLoraLoaderMixin
    from safetensors import safe_open
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".lora.", dir=out_dir) as tmp:
        HunyuanVideoLoraLoaderMixin.save_lora_weights(
            tmp, transformer_lora_layers=state_dict, safe_serialization=True, transformer_lora_adapter_metadata=config
        )
        written = RunFiles(tmp).lora  # the mixin's default weight name, which is the run's LoRA file name
        with safe_open(written, "pt") as f:
            meta = dict(f.metadata() or {})
        for key, value in {**_config_metadata(config), **metadata}.items():
            meta.setdefault(key, str(value))
        return _atomic_save(load_file(written), RunFiles(out_dir).lora, meta)


def save_comfyui_lora(
    state_dict: dict[str, torch.Tensor],
    path: Path,
    alpha: float,
    metadata: dict[str, str] | None = None,
    scales: dict[str, float] | None = None,
) -> Path:
    """The ComfyUI-format copy (names and fusing in the module docstring), written atomically to `path`."""
    tensors = to_comfyui(state_dict, alpha, scales)
    meta = {"format": "pt", "hvtune.format": COMFYUI_FORMAT, "hvtune.alpha": str(alpha), **(metadata or {})}
    return _atomic_save(tensors, Path(path), meta)


def adapter_scales(transformer) -> dict[str, float]:
    """{module: scale} of the LyCORIS (LoKr/LoHa) layers; empty for a LoRA."""
    from peft.tuners.lycoris_utils import LycorisLayer

    model = getattr(transformer, "module", transformer)
    return {
        name: float(m.scaling["default"])
        for name, m in model.named_modules()
        if isinstance(m, LycorisLayer) and "default" in m.scaling
    }


def lycoris_metadata(cfg) -> dict[str, str]:
    """The file metadata that lets `load_lycoris` rebuild a `lora_type: lycoris` adapter; empty for a LoRA."""
    if cfg.lora_type != "lycoris":
        return {}
    from hvtune.config.lycoris import read_lycoris_config

    return {"hvtune.lora_type": "lycoris", "hvtune.config.lycoris": read_lycoris_config(cfg.lycoris_config).to_json()}


def run_lora_metadata(cfg) -> dict[str, str]:
    """The metadata a trained run's diffusers-format LoRA carries beside the adapter config: the flavour, rank and
    alpha as configured and, for LyCORIS, its spec."""
    return {
        "hvtune.flavour": cfg.model_flavour,
        **rank_alpha_metadata(cfg.lora_rank, lora_alpha(cfg)),
        **lycoris_metadata(cfg),
    }


def save_run_lora(cfg, transformer, out_dir: Path) -> Path:
    """A run's two LoRA files in `out_dir` (RunFiles: `.lora`, diffusers format, and `.comfyui`), from the trained
    `transformer`; returns the diffusers-format file."""
    state_dict = lora_state_dict(transformer)
    path = save_diffusers_lora(state_dict, out_dir, run_lora_metadata(cfg), adapter_config(transformer))
    alpha = float(lora_alpha(cfg))
    save_comfyui_lora(state_dict, RunFiles(out_dir).comfyui, alpha, scales=adapter_scales(transformer))
    return path


def load_lycoris(transformer, path: str | Path) -> None:
    """Load an hvtune LyCORIS file (diffusers format) into `transformer`: the layers, shapes and scales it trained."""
    from peft.utils import set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    from hvtune.config.lycoris import LycorisSpec
    from hvtune.train.lora import add_lycoris

    path = Path(path)
    if path.is_dir():
        path = RunFiles(path).lora
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if "hvtune.config.lycoris" not in meta:
        raise ValueError(f"{path} is not an hvtune LyCORIS file (no hvtune.config.lycoris metadata)")
    add_lycoris(transformer, LycorisSpec.from_json(meta["hvtune.config.lycoris"]))
    state = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
    result = set_peft_model_state_dict(transformer, state)
    if result.unexpected_keys:
        raise ValueError(f"{path}: weights for modules this model does not adapt: {result.unexpected_keys[:3]}")


def export_run_loras(room, cfg, model, ema, output_dir: Path) -> Path:
    """The final LoRA files (`save_run_lora`) and the EMA's in `output_dir/ema`, each after checking `room` (a
    run_dir.DiskRoom) has space for it; returns the diffusers file."""
    room.check(room.export, "the final LoRA export")
    lora_path = room.write("the final LoRA export", save_run_lora, cfg, model, output_dir)
    if ema is not None:
        with ema.applied():
            room.write("the EMA LoRA export", save_run_lora, cfg, model, RunFiles(output_dir).ema.root)
    return lora_path
