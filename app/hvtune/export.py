"""LoRA files: diffusers format (loads with `transformer.load_lora_adapter`) and ComfyUI format.

Diffusers: `pytorch_lora_weights.safetensors`, keys `transformer.<module>.lora_A.weight` / `.lora_B.weight` as written
by `HunyuanVideoLoraLoaderMixin.save_lora_weights` (diffusers 0.42.1 has no `load_lora_weights` on the HunyuanVideo
1.5 pipelines; `pipe.transformer.load_lora_adapter(dir, prefix="transformer")` loads it). Stored in float32, as trained.

ComfyUI: its HunyuanVideo 1.5 model uses Tencent's original layout with FUSED q/k/v projections, and its LoRA loader
(comfy/lora.py `model_lora_keys_unet`, HunyuanVideo branch) accepts names `diffusion_model.double_blocks.N.<name>` and
has no entry for split q/k/v (same finding: finetrainers #231/#255, musubi-tuner #756). Mapping (diffusers module ->
ComfyUI LoRA name; Tencent names from diffusers' scripts/convert_hunyuan_video1_5_to_diffusers.py):

  transformer_blocks.N.attn.to_q/to_k/to_v              -> diffusion_model.double_blocks.N.img_attn_qkv   (fused)
  transformer_blocks.N.attn.to_out.0                    -> diffusion_model.double_blocks.N.img_attn_proj
  transformer_blocks.N.attn.add_q_proj/add_k_proj/add_v_proj -> diffusion_model.double_blocks.N.txt_attn_qkv (fused)
  transformer_blocks.N.attn.to_add_out                  -> diffusion_model.double_blocks.N.txt_attn_proj
  transformer_blocks.N.ff.net.0.proj / ff.net.2         -> diffusion_model.double_blocks.N.img_mlp.fc1 / img_mlp.fc2
  transformer_blocks.N.ff_context.net.0.proj / .net.2   -> diffusion_model.double_blocks.N.txt_mlp.fc1 / txt_mlp.fc2

Fusing q, k, v adapters (rank r, alpha a each) is exact: A = cat(A_q, A_k, A_v) (3r x in), B = block_diag(B_q, B_k,
B_v) (3 out x 3r), alpha = 3a so alpha/rank stays a/r. A missing member (e.g. only to_q trained) is a zero block.
ComfyUI scales by `alpha / rank` and by 1.0 when `.alpha` is missing, so `.alpha` is always written.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
_FUSED = {
    ("to_q", "to_k", "to_v"): "img_attn_qkv",
    ("add_q_proj", "add_k_proj", "add_v_proj"): "txt_attn_qkv",
}
_SINGLE = {
    "attn.to_out.0": "img_attn_proj",
    "attn.to_add_out": "txt_attn_proj",
    "ff.net.0.proj": "img_mlp.fc1",
    "ff.net.2": "img_mlp.fc2",
    "ff_context.net.0.proj": "txt_mlp.fc1",
    "ff_context.net.2": "txt_mlp.fc2",
}
_KEY = re.compile(r"^(?:transformer\.)?transformer_blocks\.(\d+)\.(.+)\.lora_([AB])\.weight$")


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft/diffusers module names (no prefix), fp32, on the CPU."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def canonical_safetensors(data: bytes) -> bytes:
    """safetensors writes `__metadata__` from a Rust HashMap, so its key order (and the file's bytes) changes from
    process to process. Sort it: the same weights and metadata then give the same bytes, which is what lets a resumed
    run be checked against an uninterrupted one byte for byte. The header keeps its length, so offsets stay valid."""
    import json
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
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    data = canonical_safetensors(save(tensors, metadata=metadata))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def adapter_config(transformer) -> dict:
    """The LoRA config (rank, alpha, targets) that diffusers stores so `load_lora_adapter` rebuilds the same scale."""
    return transformer.peft_config["default"].to_dict()


def save_diffusers_lora(
    state_dict: dict[str, torch.Tensor], out_dir: Path, metadata: dict[str, str], config: dict | None = None
) -> Path:
    """`out_dir/pytorch_lora_weights.safetensors`, keys prefixed `transformer.` like the diffusers LoRA mixin writes,
    with the adapter config in the file's metadata (without it a loader assumes alpha = rank)."""
    from diffusers.loaders import HunyuanVideoLoraLoaderMixin
    from safetensors import safe_open

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        HunyuanVideoLoraLoaderMixin.save_lora_weights(
            tmp, transformer_lora_layers=state_dict, safe_serialization=True, transformer_lora_adapter_metadata=config
        )
        written = Path(tmp) / DIFFUSERS_FILE
        with safe_open(written, "pt") as f:
            written_meta = f.metadata() or {}
        for key, value in metadata.items():
            written_meta.setdefault(key, value)
        from safetensors.torch import load_file

        return _atomic_save(load_file(written), out_dir / DIFFUSERS_FILE, written_meta)


def to_comfyui(state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Diffusers-named LoRA -> ComfyUI HunyuanVideo names, q/k/v fused (see the module docstring)."""
    modules: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        m = _KEY.match(key)
        if not m:
            raise ValueError(f"no ComfyUI name for LoRA weight {key!r} (only the main blocks are mapped)")
        modules.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = tensor
    out: dict[str, torch.Tensor] = {}
    blocks = sorted({block for block, _ in modules})
    for block in blocks:
        prefix = f"diffusion_model.double_blocks.{block}."
        for members, name in _FUSED.items():
            parts = [modules.get((block, f"attn.{m}")) for m in members]
            if not any(parts):
                continue
            present = next(p for p in parts if p)
            rank, in_features = present["A"].shape
            out_features = present["B"].shape[0]
            zero_a, zero_b = torch.zeros(rank, in_features), torch.zeros(out_features, rank)
            out[prefix + name + ".lora_A.weight"] = torch.cat([p["A"] if p else zero_a for p in parts])
            out[prefix + name + ".lora_B.weight"] = torch.block_diag(*[p["B"] if p else zero_b for p in parts])
            out[prefix + name + ".alpha"] = torch.tensor(alpha * 3)
        for module, name in _SINGLE.items():
            part = modules.get((block, module))
            if part:
                out[prefix + name + ".lora_A.weight"] = part["A"]
                out[prefix + name + ".lora_B.weight"] = part["B"]
                out[prefix + name + ".alpha"] = torch.tensor(float(alpha))
    mapped = {(b, m) for b, m in modules if m in _SINGLE or m.split(".", 1)[-1] in sum(_FUSED, ())}
    unmapped = sorted(f"transformer_blocks.{b}.{m}" for b, m in set(modules) - mapped)
    if unmapped:
        raise ValueError(f"no ComfyUI name for LoRA modules: {', '.join(unmapped[:5])}")
    return out


def save_comfyui_lora(state_dict: dict[str, torch.Tensor], path: Path, alpha: float) -> Path:
    tensors = {k: v.contiguous() for k, v in to_comfyui(state_dict, alpha).items()}
    return _atomic_save(tensors, Path(path), {"format": "pt", "hvtune.format": "comfyui-hunyuanvideo15"})
