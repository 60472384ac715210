"""The trainable adapter: LoRA targets, LoRA and LyCORIS (LoKr / LoHa) injection, and the effective alpha.

`add_lora(transformer, cfg)` runs after `hvtune.train.base_model.prepare_base`: the adapter wraps the prepared (cast,
quantized, offloaded) base layers and its weights stay float32 and resident on the training device.

- `lora_type: lora` (default): peft LoRA on `lora_target_modules`, rank `lora_rank`, alpha `lora_alpha` (default: the
  rank). `lora_target_modules` is a preset or peft module names: `simpletuner` (default) is SimpleTuner 4.10.1's set
  for HunyuanVideo, its `DEFAULT_LORA_TARGET` names matched the way peft matches a list (by suffix), so every
  attention: the 54 dual-stream blocks' and the token refiner's (440 modules on the full model, the same LoRA
  SimpleTuner trains from the same config); `main_blocks` is hvtune's earlier default, the dual-stream blocks only,
  without the last block's modules that get no gradient (430).
- `lora_type: lycoris`: peft LoKr / LoHa layers instead of LoRA, shaped and scaled by LyCORIS' rules
  (`add_lycoris`; the rules in `hvtune.config.lycoris`). Everything in `base_model` applies to them as to LoRA.
"""

from __future__ import annotations

import re

import torch

from hvtune.config.settings import TrainConfig
from hvtune.errors import UserError
from hvtune.train.base_model import is_adapter_parameter, offload_device

# SimpleTuner 4.10.1 helpers/models/hunyuanvideo/model.py HunyuanVideo.DEFAULT_LORA_TARGET (test_simpletuner_parity.py
# compares them with the wheel)
SIMPLETUNER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# In the last dual-stream block the model drops the text stream's output (forward() keeps only hidden_states after the
# loop), so these modules get no gradient (to_add_out, ff_context: None) or an all-zero one (add_q_proj: text queries
# only produce text outputs). LoRA on them would train nothing, and DDP would need find_unused_parameters=True.
LAST_BLOCK_DEAD = ("attn.to_add_out", "attn.add_q_proj", "ff_context.net.0.proj", "ff_context.net.2")


def lora_alpha(cfg: TrainConfig) -> float:
    """The LoRA alpha peft trains with and the exported files say: `lora_alpha`, or the rank when it is unset (the
    config refuses 0)."""
    return cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank


def main_blocks_target_modules() -> str:
    """The `main_blocks` preset, a regex (peft full-matches it against module names): the projections in the main
    dual-stream blocks, not the token refiner's same-named layers. The last block's dead modules are removed by
    `lora_config`."""
    names = "|".join(re.escape(t) for t in SIMPLETUNER_TARGETS)
    return rf"transformer_blocks\.\d+\.attn\.({names})"


def target_modules(cfg: TrainConfig) -> str | list[str]:
    """peft's target_modules for `lora_target_modules`: a preset's, or the user's module names as given."""
    if cfg.lora_target_modules == "simpletuner":
        return list(SIMPLETUNER_TARGETS)
    if cfg.lora_target_modules == "main_blocks":
        return main_blocks_target_modules()
    return cfg.lora_target_modules


def dead_modules(transformer) -> list[str]:
    """Full names of the last block's modules whose LoRA would never get a (non-zero) gradient."""
    last = transformer.config.num_layers - 1
    return [f"transformer_blocks.{last}.{name}" for name in LAST_BLOCK_DEAD]


def lora_config(transformer, cfg: TrainConfig):
    """The peft LoraConfig for this run: rank, alpha (default = rank), dropout, init, targets. The `simpletuner` preset
    keeps SimpleTuner's whole set, the last block's dead modules included (their LoRA stays a zero delta, and
    `_make_adapter_trainable` keeps DDP off them); any other targets leave the dead modules out."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = target_modules(cfg)
    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=lora_alpha(cfg),
        lora_dropout=cfg.lora_dropout,
        init_lora_weights="gaussian" if cfg.lora_init_type == "gaussian" else True,
        target_modules=targets,
    )
    if cfg.lora_target_modules == "simpletuner":
        return config
    names = {name for name, _ in transformer.named_modules()}
    # exclude only what the targets would match: peft warns about an exclusion list that excluded nothing
    excluded = [
        name for name in dead_modules(transformer) if name in names and check_target_module_exists(config, name)
    ]
    if excluded:
        config.exclude_modules = excluded
    return config


def lora_parameters(transformer) -> list[torch.nn.Parameter]:
    return [p for name, p in transformer.named_parameters() if is_adapter_parameter(name)]


def add_lora(transformer, cfg: TrainConfig) -> None:
    """Inject a LoRA adapter through diffusers' PEFT integration (`transformer.add_adapter`). LoRA weights float32 and
    trainable, everything else frozen. LoRA A's random init draws from the global RNG: seed it before calling."""
    if cfg.lora_type == "lycoris":
        from hvtune.config.lycoris import read_lycoris_config

        add_lycoris(transformer, read_lycoris_config(cfg.lycoris_config))
    else:
        config = lora_config(transformer, cfg)
        try:
            transformer.add_adapter(config)
        except ValueError as e:  # peft: "Target modules ... not found in the base model"
            if "target" not in str(e).lower():
                raise
            raise UserError(f"lora_target_modules {cfg.lora_target_modules!r} match no layer of the transformer") from e
    _make_adapter_trainable(transformer)


def _make_adapter_trainable(transformer) -> None:
    device = offload_device(transformer)
    frozen, dead_adapter = [], []
    dead = tuple(f"{name}." for name in dead_modules(transformer))
    for name, param in transformer.named_parameters():
        if is_adapter_parameter(name):  # resident on the training device even when the base is offloaded
            param.data = param.data.to(device=device or param.device, dtype=torch.float32)
            param.requires_grad_(True)
            if name.startswith(dead):
                dead_adapter.append(name)
        else:
            param.requires_grad_(False)
            frozen.append(name)
    # DDP (accelerate launch with N processes) would broadcast the whole frozen base from rank 0 at wrap time and
    # refuse a module whose parameters sit on two device types (an offloaded base on the CPU, LoRA on the GPU): it only
    # needs to know the LoRA weights, every rank loads the same base. The LoRA of the last block's dead modules (the
    # simpletuner preset keeps them) gets no gradient on any rank: synced, DDP would need find_unused_parameters.
    buffers = [name for name, _ in transformer.named_buffers()]
    transformer._ddp_params_and_buffers_to_ignore = frozen + dead_adapter + buffers


def lycoris_targets(transformer, spec) -> dict[str, str]:
    """{Linear module name: the apply_preset class it sits in} for `spec`, minus the last block's dead modules."""
    dead = set(dead_modules(transformer))
    targets: dict[str, str] = {}
    for name, module in transformer.named_modules():
        cls = type(module).__name__
        if cls not in spec.target_classes:
            continue
        for sub, leaf in module.named_modules():
            full = f"{name}.{sub}" if sub else name
            if isinstance(leaf, torch.nn.Linear) and full not in dead:
                targets.setdefault(full, cls)
    return targets


def add_lycoris(transformer, spec) -> None:
    """peft LoKr / LoHa layers with LyCORIS' per-layer rules (hvtune.config.lycoris docstring): per-class factor, which
    halves are split, scale, and LyCORIS' init (w1 random, w2 zero). The adapter is named "default" like LoRA's."""
    from peft import LoHaConfig, LoKrConfig

    targets = lycoris_targets(transformer, spec)
    if not targets:
        classes = sorted({type(m).__name__ for m in transformer.modules()} & {"Attention", "FeedForward"})
        raise UserError(
            f"lycoris_config apply_preset.target_module {list(spec.target_classes)} matches no module of the "
            f"HunyuanVideo 1.5 transformer; its adaptable classes are {classes}"
        )
    common = dict(
        r=spec.dim,
        alpha=spec.alpha,
        rank_dropout=spec.rank_dropout,
        module_dropout=spec.module_dropout,
        target_modules=sorted(targets),
    )
    if spec.algo == "loha":
        transformer.add_adapter(LoHaConfig(**common))
        return
    transformer.add_adapter(
        LoKrConfig(**common, decompose_factor=spec.factor, decompose_both=spec.decompose_both, init_weights="lycoris")
    )
    for name, module in transformer.named_modules():
        if name in targets:
            _lycoris_lokr_layer(module, spec, spec.factor_for(targets[name]))


def _lycoris_lokr_layer(layer, spec, factor: int) -> None:
    """Rebuild one peft LoKr layer's weights with LyCORIS' shapes and scale (peft has no full_matrix and no per-class
    factor, and scales full w1 x full w2 by alpha / r where LyCORIS uses 1)."""
    from peft.tuners.lokr.layer import factorization

    base = layer.get_base_layer()
    out_l, out_k = factorization(base.out_features, factor)
    in_m, in_n = factorization(base.in_features, factor)
    use_w1 = not (spec.decompose_both and spec.dim < max(out_l, in_m) / 2)
    use_w2 = not (spec.dim < max(out_k, in_n) / 2 and not spec.full_matrix)
    for weights in (layer.lokr_w1, layer.lokr_w1_a, layer.lokr_w1_b, layer.lokr_w2, layer.lokr_w2_a, layer.lokr_w2_b):
        if "default" in weights:
            del weights["default"]
    layer.create_adapter_parameters("default", spec.dim, ((out_l, out_k), (in_m, in_n)), use_w1, use_w2, False)
    layer.reset_adapter_parameters_lycoris_way("default")
    layer.scaling["default"] = 1.0 if use_w1 and use_w2 else spec.alpha / spec.dim
    layer._move_adapter_to_device_of_base_layer("default")
