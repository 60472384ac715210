"""Tiny encoder roots in Tencent's own layout (llm/, byt5-small/, Glyph-SDXL-v2/), written for tests and the demo
from the tiny model's encoders, so that layout's detection and loading code runs on real files."""

from __future__ import annotations

import json
from pathlib import Path

from hvtune.model.encoder_layouts import (
    BYT5,
    GLYPH,
    GLYPH_CHECKPOINT,
    GLYPH_COLORS,
    GLYPH_FONTS,
    GLYPH_KEY_PREFIX,
    LLM,
)

TINY_GLYPH_COLORS = {"white": 0, "black": 1, "red": 2}
TINY_GLYPH_FONTS = {"en-Montserrat-Regular": 0, "zh-SourceHanSansSC-Regular": 1}


def _legacy_qwen_vl_config(config) -> dict:
    """The hub's Qwen2.5-VL-7B-Instruct config.json shape: text fields at top level, `rope_scaling` of type mrope,
    nested `vision_config`."""
    d = config.to_dict()
    text = d.pop("text_config")
    rope = text.pop("rope_parameters", None) or {}
    for key in ("model_type", "layer_types", "rope_scaling", "dtype"):
        text.pop(key, None)
    vision = {k: v for k, v in d.pop("vision_config").items() if k not in ("model_type", "rope_parameters")}
    d.pop("dtype", None)
    return {
        **d,
        **text,
        "model_type": "qwen2_5_vl",
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "torch_dtype": "float32",
        "rope_theta": rope.get("rope_theta", 1000000.0),
        "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]},
        "vision_config": vision,
    }


def write_tiny_tencent_text_root(out: str | Path, seed: int = 0) -> Path:
    """A tiny text root in Tencent's layout whose encoders are those of `tiny_model.build_components(seed=seed)`,
    so it encodes prompts exactly as the tiny diffusers-layout model does (glyph tokens aside). Files as on the hub:

    * llm/: a Qwen2_5_VLForConditionalGeneration (tiny vision tower, random lm_head) whose language model is the
      tiny text encoder; sharded safetensors + index with the legacy `model.*` / `visual.*` keys, the legacy flat
      config.json, tokenizer.json + tokenizer_config.json carrying the chat template, and chat_template.json;
    * byt5-small/: a T5ForConditionalGeneration with *other* random weights (the Glyph checkpoint replaces all of
      the encoder's), saved as pytorch_model.bin, and the ByT5 tokenizer config;
    * Glyph-SDXL-v2/: assets/*.json with 3 colours and 2 fonts, checkpoints/byt5_model.pt = {"state_dict":
      {"module.text_tower.encoder.<T5Stack key>": tensor}} holding the tiny ByT5 encoder, its embedding grown by 5
      rows for the special tokens.

    Written in a temp folder beside `out`, then renamed."""
    from hvtune.files import atomic_directory
    from hvtune.testing.tiny_model import build_components

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    components = build_components("t2v", seed)
    with atomic_directory(out) as tmp:
        _write_llm(tmp / LLM, components["text_encoder"], components["tokenizer"], seed)
        _write_byt5(tmp / BYT5, components["text_encoder_2"], components["tokenizer_2"], seed)
        _write_glyph(tmp / GLYPH, components["text_encoder_2"], seed)
    return out


def _write_llm(llm: Path, qwen, qwen_tokenizer, seed: int) -> None:
    """llm/: a tiny Qwen2_5_VLForConditionalGeneration around `qwen`, saved as the hub's Qwen2.5-VL-7B-Instruct."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed * 1000 + 101)
    vl = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config=qwen.config.to_dict(),
            vision_config=dict(
                depth=1,
                hidden_size=16,
                intermediate_size=32,
                num_heads=2,
                out_hidden_size=qwen.config.hidden_size,
                patch_size=2,
                spatial_merge_size=1,
                temporal_patch_size=1,
                window_size=4,
                fullatt_block_indexes=[0],
            ),
            bos_token_id=None,
            eos_token_id=None,
        )
    ).eval()
    vl.model.language_model.load_state_dict(qwen.state_dict())
    vl.save_pretrained(llm, max_shard_size="40KB")
    (llm / "config.json").write_text(json.dumps(_legacy_qwen_vl_config(vl.config), indent=2, sort_keys=True))
    qwen_tokenizer.save_pretrained(llm)
    template = qwen_tokenizer.chat_template
    (llm / "chat_template.jinja").unlink(missing_ok=True)
    tok_config = json.loads((llm / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = template
    (llm / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, sort_keys=True))
    (llm / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2))


def _write_byt5(byt5: Path, t5, tokenizer, seed: int) -> None:
    """byt5-small/: a T5ForConditionalGeneration with other random weights than `t5`, as pytorch_model.bin."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    base = {k: v for k, v in t5.config.to_dict().items() if k not in ("architectures", "dtype", "transformers_version")}
    config = T5Config(
        **{
            **base,
            "is_encoder_decoder": True,
            "use_cache": True,
            "num_decoder_layers": 1,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
            "eos_token_id": 1,
        }
    )
    torch.manual_seed(seed * 1000 + 102)
    t5_base = T5ForConditionalGeneration(config).eval()
    byt5.mkdir()
    config.architectures = ["T5ForConditionalGeneration"]
    config_dict = {**config.to_dict(), "tie_word_embeddings": False, "tokenizer_class": "ByT5Tokenizer"}
    (byt5 / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    torch.save({k: v.clone().contiguous() for k, v in t5_base.state_dict().items()}, byt5 / "pytorch_model.bin")
    tokenizer.save_pretrained(byt5)


def _write_glyph(glyph: Path, t5, seed: int) -> None:
    """Glyph-SDXL-v2/: the colour and font assets, and the checkpoint holding `t5`'s encoder with the glyph tokens."""
    import torch

    (glyph / "assets").mkdir(parents=True)
    (glyph / "checkpoints").mkdir()
    (glyph / GLYPH_COLORS).write_text(json.dumps(TINY_GLYPH_COLORS))
    (glyph / GLYPH_FONTS).write_text(json.dumps(TINY_GLYPH_FONTS))
    stack = {k: v.clone().contiguous() for k, v in t5.encoder.state_dict().items()}
    torch.manual_seed(seed * 1000 + 103)
    extra = len(TINY_GLYPH_COLORS) + len(TINY_GLYPH_FONTS)
    embed = stack["embed_tokens.weight"]
    stack["embed_tokens.weight"] = torch.cat([embed, torch.randn(extra, embed.shape[1], dtype=embed.dtype)])
    torch.save({"state_dict": {GLYPH_KEY_PREFIX + k: v for k, v in stack.items()}}, glyph / GLYPH_CHECKPOINT)
