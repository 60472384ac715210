"""The ComfyUI-format LoRA: diffusers module names -> ComfyUI's HunyuanVideo 1.5 names, q/k/v fused. The file itself is
written by `export.save_comfyui_lora`; docs/LORA_FORMATS.md describes the format for users.

ComfyUI: its HunyuanVideo 1.5 model (`comfy.model_base.HunyuanVideo15`, a subclass of `HunyuanVideo`) uses Tencent's
layout with Flux-style double blocks whose attention has ONE fused `qkv` linear (rows q, k, v). Its LoRA loader
(comfyanonymous/ComfyUI comfy/lora.py `model_lora_keys_unet`, `HunyuanVideo` branch) accepts, for a model weight
`diffusion_model.X.weight`, the LoRA name `diffusion_model.` + X with `_attn.qkv.` -> `_attn_qkv.`, `_attn.proj.` ->
`_attn_proj.`, `mlp.0.` -> `mlp.fc1.`, `mlp.2.` -> `mlp.fc2.`, `_mod.lin.` -> `_mod.linear.` (i.e. Tencent's names),
and has no entry for split q/k/v (finetrainers #231/#255, musubi-tuner #756 ran into the same). It reads
`<name>.lora_A.weight`, `<name>.lora_B.weight` and scales by `<name>.alpha / rank` (1.0 when `.alpha` is missing, so
`.alpha` is always written). Diffusers -> Tencent names from diffusers' scripts/convert_hunyuan_video1_5_to_diffusers.py
(`convert_hyvideo15_transformer_to_diffusers`). Mapping (N = block, i = refiner block):

  diffusers module                                          ComfyUI LoRA name (prefix `diffusion_model.`)
  transformer_blocks.N.attn.to_q + to_k + to_v              double_blocks.N.img_attn_qkv         (fused)
  transformer_blocks.N.attn.add_q_proj + add_k_proj + add_v_proj
                                                            double_blocks.N.txt_attn_qkv         (fused)
  transformer_blocks.N.attn.to_out.0                        double_blocks.N.img_attn_proj
  transformer_blocks.N.attn.to_add_out                      double_blocks.N.txt_attn_proj
  transformer_blocks.N.ff.net.0.proj / ff.net.2             double_blocks.N.img_mlp.fc1 / img_mlp.fc2
  transformer_blocks.N.ff_context.net.0.proj / net.2        double_blocks.N.txt_mlp.fc1 / txt_mlp.fc2
  transformer_blocks.N.norm1.linear / norm1_context.linear  double_blocks.N.img_mod.linear / txt_mod.linear
  context_embedder.token_refiner.refiner_blocks.i.attn.to_q + to_k + to_v
                                                            txt_in.individual_token_refiner.blocks.i.self_attn_qkv
  ...refiner_blocks.i.attn.to_out.0                         txt_in.individual_token_refiner.blocks.i.self_attn_proj
  ...refiner_blocks.i.ff.net.0.proj / ff.net.2              txt_in.individual_token_refiner.blocks.i.mlp.fc1 / fc2
  ...refiner_blocks.i.norm_out.linear                       txt_in.individual_token_refiner.blocks.i.adaLN_modulation.1
  proj_out                                                  final_layer.linear
  norm_out.linear                                           final_layer.adaLN_modulation.1  (lora_B halves swapped:
                                                            diffusers stores (scale, shift), Tencent (shift, scale))

Other modules (embedders) have no mapping and raise ValueError naming them.

Fusing q, k, v adapters (rank r, alpha a each) is exact: A = cat(A_q, A_k, A_v) (3r x in), B = block_diag(B_q, B_k,
B_v) (3 out x 3r), alpha = 3a, so alpha / rank stays a / r and (alpha / rank) B A = cat of the three separate deltas.
A member that was not trained (e.g. only to_q targeted) is a zero block.

LyCORIS (`lora_type: lycoris`, peft LoKr/LoHa layers): the ComfyUI file uses ComfyUI's LyCORIS names
(comfy/weight_adapter/lokr.py and loha.py): `<name>.lokr_w1` / `.lokr_w2` (or `_a`/`_b` factors), `<name>.hada_w1_a`
... `.hada_w2_b`, and `<name>.alpha`, which ComfyUI divides by the rank of the split factor (`w2_b`'s or `w1_b`'s rows
for LoKr, `w1_b`'s for LoHa) and ignores when neither LoKr half is split (a LoKr with two full halves is applied at
scale 1, so any other scale is folded into `lokr_w1`). Fused q/k/v: LoHa fuses exactly like LoRA (w1_a and w2_a block
diagonal, w1_b and w2_b stacked, alpha x 3); a Kronecker product does not stack, so fused q/k/v of a LoKr is written
as ComfyUI's `<name>.diff` (the full weight difference, bfloat16: for the full model about 2.7 GB when every block's
q/k/v is adapted; the diffusers-format file stays small).
"""

from __future__ import annotations

import re

import torch

_BLOCK = (r"transformer_blocks\.(\d+)\.", "double_blocks.{}.")
_REFINER = (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.", "txt_in.individual_token_refiner.blocks.{}.")
# (block pattern, ComfyUI block prefix, {diffusers module in the block: ComfyUI name}); tuples are fused q/k/v
_RULES = (
    (
        *_BLOCK,
        {
            ("attn.to_q", "attn.to_k", "attn.to_v"): "img_attn_qkv",
            ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "txt_attn_qkv",
            "attn.to_out.0": "img_attn_proj",
            "attn.to_add_out": "txt_attn_proj",
            "ff.net.0.proj": "img_mlp.fc1",
            "ff.net.2": "img_mlp.fc2",
            "ff_context.net.0.proj": "txt_mlp.fc1",
            "ff_context.net.2": "txt_mlp.fc2",
            "norm1.linear": "img_mod.linear",
            "norm1_context.linear": "txt_mod.linear",
        },
    ),
    (
        *_REFINER,
        {
            ("attn.to_q", "attn.to_k", "attn.to_v"): "self_attn_qkv",
            "attn.to_out.0": "self_attn_proj",
            "ff.net.0.proj": "mlp.fc1",
            "ff.net.2": "mlp.fc2",
            "norm_out.linear": "adaLN_modulation.1",
        },
    ),
    ("", "", {"proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}),
)
_SWAP_B = {"final_layer.adaLN_modulation.1"}  # diffusers' converter swapped (shift, scale) -> (scale, shift) here
_KEY = re.compile(r"^(?:transformer\.)?(.+)\.lora_([AB])\.weight$")
_LYCORIS_KEY = re.compile(r"^(?:transformer\.)?(.+)\.((?:lokr_w[12](?:_[ab])?)|(?:hada_w[12]_[ab]))$")


def _comfy_name(module: str) -> tuple[str, str | None, int] | None:
    """diffusers module -> (ComfyUI LoRA name, fused group key or None, position in the fused group)."""
    for pattern, prefix, table in _RULES:
        m = re.match(pattern, module)
        if not m:
            continue
        rest = module[m.end() :]
        out_prefix = prefix.format(*m.groups())
        for members, name in table.items():
            if isinstance(members, tuple) and rest in members:
                return out_prefix + name, out_prefix + name, members.index(rest)
            if rest == members:
                return out_prefix + name, None, 0
    return None


def _by_module(
    state_dict: dict[str, torch.Tensor], key: re.Pattern[str], kind: str
) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {weight kind: tensor}} from names `key` splits into (module, kind); ValueError for any other name."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        m = key.match(name)
        if not m:
            raise ValueError(f"not a {kind} weight name: {name!r}")
        modules.setdefault(m.group(1), {})[m.group(2)] = tensor
    return modules


def to_comfyui(
    state_dict: dict[str, torch.Tensor], alpha: float, scales: dict[str, float] | None = None
) -> dict[str, torch.Tensor]:
    """Diffusers-named LoRA (as `lora_state_dict` returns it) -> ComfyUI HunyuanVideo 1.5 names, q/k/v fused (see the
    module docstring). `alpha` is the adapter's lora_alpha (one for all modules, as hvtune trains). A LyCORIS state
    dict needs `scales` ({module: scale}, from `adapter_scales`)."""
    if any(_LYCORIS_KEY.match(k) for k in state_dict):
        return _lycoris_to_comfyui(state_dict, scales or {})
    modules = _by_module(state_dict, _KEY, "LoRA")
    unmapped = sorted(name for name in modules if _comfy_name(name) is None)
    if unmapped:
        raise ValueError(f"no ComfyUI name for LoRA modules: {', '.join(unmapped[:5])}")
    incomplete = sorted(name for name, ab in modules.items() if set(ab) != {"A", "B"})
    if incomplete:
        raise ValueError(f"LoRA modules without both lora_A and lora_B: {', '.join(incomplete[:5])}")

    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[dict[str, torch.Tensor] | None]] = {}
    for module, ab in sorted(modules.items()):
        name, group, position = _comfy_name(module)
        if group is not None:
            fused.setdefault(group, [None, None, None])[position] = ab
            continue
        b = ab["B"]
        if name in _SWAP_B:
            b = torch.cat(b.chunk(2, dim=0)[::-1])
        out[f"diffusion_model.{name}.lora_A.weight"] = ab["A"].contiguous()
        out[f"diffusion_model.{name}.lora_B.weight"] = b.contiguous()
        out[f"diffusion_model.{name}.alpha"] = torch.tensor(float(alpha))
    for name, parts in sorted(fused.items()):
        present = next(p for p in parts if p is not None)
        rank, in_features = present["A"].shape
        out_features = present["B"].shape[0]
        zero_a = torch.zeros(rank, in_features, dtype=present["A"].dtype)
        zero_b = torch.zeros(out_features, rank, dtype=present["B"].dtype)
        out[f"diffusion_model.{name}.lora_A.weight"] = torch.cat([p["A"] if p else zero_a for p in parts])
        out[f"diffusion_model.{name}.lora_B.weight"] = torch.block_diag(*[p["B"] if p else zero_b for p in parts])
        out[f"diffusion_model.{name}.alpha"] = torch.tensor(float(alpha) * 3)
    return out


def _lycoris_to_comfyui(state_dict: dict[str, torch.Tensor], scales: dict[str, float]) -> dict[str, torch.Tensor]:
    modules = _by_module(state_dict, _LYCORIS_KEY, "LyCORIS")
    unmapped = sorted(name for name in modules if _comfy_name(name) is None or _comfy_name(name)[0] in _SWAP_B)
    if unmapped:
        raise ValueError(f"no ComfyUI LyCORIS name for modules: {', '.join(unmapped[:5])}")
    missing = sorted(name for name in modules if name not in scales)
    if missing:
        raise ValueError(f"no scale for LyCORIS modules: {', '.join(missing[:5])}")
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[tuple[str, dict[str, torch.Tensor]] | None]] = {}
    for module, weights in sorted(modules.items()):
        name, group, position = _comfy_name(module)
        if group is not None:
            fused.setdefault(group, [None, None, None])[position] = (module, weights)
            continue
        prefix = f"diffusion_model.{name}"
        scale = scales[module]
        if "hada_w1_a" in weights:
            out.update({f"{prefix}.{k}": v.contiguous() for k, v in weights.items()})
            out[f"{prefix}.alpha"] = torch.tensor(scale * weights["hada_w1_b"].shape[0])
            continue
        w = dict(weights)
        rank = w["lokr_w2_b"].shape[0] if "lokr_w2_b" in w else w["lokr_w1_b"].shape[0] if "lokr_w1_b" in w else None
        if rank is None:  # two full halves: ComfyUI applies them at scale 1
            w["lokr_w1"] = w["lokr_w1"] * scale
        else:
            out[f"{prefix}.alpha"] = torch.tensor(scale * rank)
        out.update({f"{prefix}.{k}": v.contiguous() for k, v in w.items()})
    for name, parts in sorted(fused.items()):
        out.update(_fused_lycoris(f"diffusion_model.{name}", parts, scales))
    return out


def _lycoris_delta(weights: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """The weight difference a LoKr or LoHa layer adds (peft's and LyCORIS' formula)."""

    def half(n):
        return weights[f"{n}"] if n in weights else weights[f"{n}_a"] @ weights[f"{n}_b"]

    if "hada_w1_a" in weights:
        w = weights
        return scale * (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])
    return scale * torch.kron(half("lokr_w1"), half("lokr_w2"))


def _fused_lycoris(prefix: str, parts, scales: dict[str, float]) -> dict[str, torch.Tensor]:
    present = [p for p in parts if p is not None]
    module, first = present[0]
    if "hada_w1_a" in first:  # exact: block-diagonal a's, stacked b's, alpha x 3 keeps alpha / rank
        rank = first["hada_w1_b"].shape[0]
        out_features = first["hada_w1_a"].shape[0]
        in_features = first["hada_w1_b"].shape[1]
        scale = scales[module]
        if any(scales[m] != scale for m, _ in present):
            raise ValueError(f"{prefix}: q, k and v LoHa layers with different scales cannot be fused")
        zero_a, zero_b = torch.zeros(out_features, rank), torch.zeros(rank, in_features)
        tensors = {}
        for n in ("hada_w1", "hada_w2"):
            tensors[f"{prefix}.{n}_a"] = torch.block_diag(*[p[1][f"{n}_a"] if p else zero_a for p in parts])
            tensors[f"{prefix}.{n}_b"] = torch.cat([p[1][f"{n}_b"] if p else zero_b for p in parts])
        tensors[f"{prefix}.alpha"] = torch.tensor(scale * rank * 3)
        return tensors
    deltas = {m: _lycoris_delta(w, scales[m]) for m, w in present}
    shape = next(iter(deltas.values())).shape
    diff = torch.cat([deltas[p[0]] if p else torch.zeros(shape) for p in parts])
    return {f"{prefix}.diff": diff.to(torch.bfloat16).contiguous()}
