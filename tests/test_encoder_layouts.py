"""Text-encoder folder layouts: Tencent's (llm/, byt5-small/, Glyph-SDXL-v2/) detected, checked and loaded into the
same models the diffusers layout gives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hvtune.model.encoder_layouts import (
    GLYPH_KEY_PREFIX,
    EncoderLayoutError,
    glyph_state_dict,
    load_qwen_tokenizer,
    load_tencent_text_encoders,
    missing_text_files,
    tencent_text_root,
    text_component_dirs,
    text_layout,
    text_layout_hint,
    vision_root,
)
from hvtune.testing.tiny_encoders import TINY_GLYPH_COLORS, TINY_GLYPH_FONTS, write_tiny_tencent_text_root

CAPTION = 'A red ball rolls past a sign that says "OPEN 24h".'


@pytest.fixture(scope="module")
def tencent_root(tmp_path_factory) -> Path:
    return write_tiny_tencent_text_root(tmp_path_factory.mktemp("tencent") / "text_encoder", seed=0)


@pytest.fixture(scope="module")
def tencent_encoders(tencent_root) -> dict:
    return load_tencent_text_encoders(tencent_root)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_layout_detection(tencent_root, tiny_t2v, tmp_path):
    assert text_layout(tencent_root) == "tencent" and tencent_text_root(tencent_root) == tencent_root
    # Tencent's ckpts/ (the parent holding text_encoder/llm ...) is recognised and stepped into
    ckpts = tencent_root.parent
    assert text_layout(ckpts) == "tencent" and tencent_text_root(ckpts) == tencent_root
    assert text_component_dirs(ckpts) == {
        "text_encoder": tencent_root / "llm",
        "tokenizer": tencent_root / "llm",
        "text_encoder_2": tencent_root / "Glyph-SDXL-v2",
        "tokenizer_2": tencent_root / "byt5-small",
    }
    # a diffusers root (its text_encoder/ is a component, not Tencent's folder) and an empty one are diffusers
    assert text_layout(tiny_t2v) == "diffusers" and missing_text_files(tiny_t2v) == []
    assert text_component_dirs(tiny_t2v)["text_encoder_2"] == tiny_t2v / "text_encoder_2"
    assert text_layout(tmp_path) == "diffusers" and text_layout_hint(tmp_path).startswith("expected the diffusers")
    # pointing at the Qwen snapshot itself: told to use the parent
    assert text_layout(tencent_root / "llm") == "diffusers"
    assert "point at its parent" in text_layout_hint(tencent_root / "llm")
    assert "text_encoder/config.json" in missing_text_files(tmp_path)
    # one Tencent folder is enough to call it Tencent's layout; the check then names the rest
    (tmp_path / "byt5-small").mkdir()
    assert text_layout(tmp_path) == "tencent"
    missing = missing_text_files(tmp_path)
    assert "llm/config.json" in missing and "Glyph-SDXL-v2/checkpoints/byt5_model.pt" in missing


def test_completeness_names_missing_files(tencent_root, tmp_path):
    assert missing_text_files(tencent_root) == []
    ckpts = tmp_path / "ckpts"
    root = _copy(tencent_root, ckpts / "text_encoder")
    (root / "Glyph-SDXL-v2/checkpoints/byt5_model.pt").unlink()
    index = json.loads((root / "llm/model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (root / "llm" / shard).unlink()
    assert missing_text_files(root) == ["Glyph-SDXL-v2/checkpoints/byt5_model.pt", f"llm/{shard}"]
    # paths are relative to the folder the user gave
    assert missing_text_files(ckpts) == [
        "text_encoder/Glyph-SDXL-v2/checkpoints/byt5_model.pt",
        f"text_encoder/llm/{shard}",
    ]
    with pytest.raises(EncoderLayoutError, match=r"missing Glyph-SDXL-v2/checkpoints/byt5_model\.pt"):
        load_tencent_text_encoders(root)
    # a text-only Qwen in llm/ is named, not loaded half-right
    config = json.loads((root / "llm/config.json").read_text())
    (root / "llm/config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    assert any("model_type 'qwen2'" in m for m in missing_text_files(root))


def test_loaded_weights_are_the_saved_ones(tencent_root, tencent_encoders):
    from transformers import Qwen2_5_VLForConditionalGeneration, T5EncoderModel

    from hvtune.testing.tiny_model import build_components

    enc = tencent_encoders
    assert {k: type(v).__name__ for k, v in enc.items()} == {
        "tokenizer": "Qwen2Tokenizer",
        "text_encoder": "Qwen2_5_VLTextModel",
        "tokenizer_2": "ByT5Tokenizer",
        "text_encoder_2": "T5EncoderModel",
    }
    tiny = build_components("t2v", seed=0)
    # Qwen: the tiny text encoder, and what diffusers' converter gets (full VL model, .language_model)
    loaded = enc["text_encoder"].state_dict()
    full = Qwen2_5_VLForConditionalGeneration.from_pretrained(tencent_root / "llm").model.language_model.state_dict()
    expected = tiny["text_encoder"].state_dict()
    assert loaded.keys() == expected.keys() == full.keys()
    assert all(torch.equal(loaded[k], expected[k]) and torch.equal(loaded[k], full[k]) for k in expected)
    # ByT5: every encoder weight is the Glyph checkpoint's, none left from byt5-small
    ckpt = torch.load(tencent_root / "Glyph-SDXL-v2/checkpoints/byt5_model.pt", weights_only=True)["state_dict"]
    t5 = enc["text_encoder_2"]
    stack = t5.encoder.state_dict()
    assert {GLYPH_KEY_PREFIX + k for k in stack} == set(ckpt)
    assert all(torch.equal(v, ckpt[GLYPH_KEY_PREFIX + k]) for k, v in stack.items())
    assert t5.shared.weight is t5.encoder.embed_tokens.weight
    base = T5EncoderModel.from_pretrained(tencent_root / "byt5-small").encoder.state_dict()
    q = "block.0.layer.0.SelfAttention.q.weight"
    assert not torch.equal(base[q], stack[q])
    tiny_stack = tiny["text_encoder_2"].encoder.state_dict()
    n = tiny_stack["embed_tokens.weight"].shape[0]
    assert torch.equal(stack["embed_tokens.weight"][:n], tiny_stack["embed_tokens.weight"])
    assert all(torch.equal(stack[k], v) for k, v in tiny_stack.items() if k != "embed_tokens.weight")
    # dtype is honoured
    bf16 = load_tencent_text_encoders(tencent_root, dtype=torch.bfloat16)
    assert bf16["text_encoder"].dtype == bf16["text_encoder_2"].dtype == torch.bfloat16


def test_glyph_tokens_map_to_checkpoint_rows(tencent_root, tencent_encoders):
    tok, t5 = tencent_encoders["tokenizer_2"], tencent_encoders["text_encoder_2"]
    n_colors, n_fonts = len(TINY_GLYPH_COLORS), len(TINY_GLYPH_FONTS)
    assert len(tok) == 384 + n_colors + n_fonts == t5.config.vocab_size
    # Tencent's order: colours, then fonts as <{lang}-font-{idx}>
    ids = tok("<color-2><zh-font-1>", add_special_tokens=False).input_ids
    assert ids == [384 + 2, 384 + n_colors + 1]
    ckpt = torch.load(tencent_root / "Glyph-SDXL-v2/checkpoints/byt5_model.pt", weights_only=True)["state_dict"]
    assert torch.equal(t5.shared.weight[ids], ckpt[GLYPH_KEY_PREFIX + "embed_tokens.weight"][ids])


def test_tencent_layout_encodes_prompts_like_the_diffusers_layout(tiny_t2v, tencent_encoders):
    from hvtune.cache.encoders import encode_caption
    from hvtune.cache.keys import TEXT_CROP_START, system_message
    from hvtune.cache.store import TEXT_MAX_LENGTH
    from hvtune.config.schema import TrainConfig
    from hvtune.model.registry import load_text_encoders, resolve_model

    diffusers = load_text_encoders(resolve_model(TrainConfig(pretrained_model_name_or_path=str(tiny_t2v)), env={}))
    tencent = tencent_encoders
    # the pipeline's chat template call, as _get_mllm_prompt_embeds makes it
    messages = [[{"role": "system", "content": system_message()}, {"role": "user", "content": CAPTION}]]
    kwargs = dict(
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        padding="max_length",
        max_length=TEXT_MAX_LENGTH + TEXT_CROP_START,
        truncation=True,
        return_tensors="pt",
    )
    a = tencent["tokenizer"].apply_chat_template(messages, **kwargs)
    b = diffusers["tokenizer"].apply_chat_template(messages, **kwargs)
    assert tencent["tokenizer"].padding_side == "right" and a.attention_mask[0, 0] == 1
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
    assert tencent["tokenizer"].decode(a.input_ids[0][:20]).startswith("<|im_start|>system\nYou are")
    ours = encode_caption(tencent, CAPTION, torch.device("cpu"))
    theirs = encode_caption(diffusers, CAPTION, torch.device("cpu"))
    assert ours["prompt_embeds_2"].shape[0] > 0  # the quoted text went through ByT5
    for key in ("prompt_embeds", "prompt_embeds_2"):
        assert torch.equal(ours[key], theirs[key]), key


def test_chat_template_from_processor_file_and_glyph_key_forms(tencent_root, tmp_path):
    llm = tmp_path / "llm"
    llm.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.json"):
        shutil.copy(tencent_root / "llm" / name, llm / name)
    config = json.loads((llm / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (llm / "tokenizer_config.json").write_text(json.dumps(config))
    template = json.loads((llm / "chat_template.json").read_text())["chat_template"]
    assert load_qwen_tokenizer(llm).chat_template == template
    (llm / "chat_template.json").unlink()
    with pytest.raises(EncoderLayoutError, match="no chat template"):
        load_qwen_tokenizer(llm)
    # byt5_model.pt: wrapped keeps only the text tower (Tencent); a bare stack dict loads as is
    w = torch.zeros(1)
    wrapped = {"state_dict": {GLYPH_KEY_PREFIX + "final_layer_norm.weight": w, "module.byt5_mapper.fc1.weight": w}}
    assert list(glyph_state_dict(wrapped)) == ["final_layer_norm.weight"]
    assert list(glyph_state_dict({"final_layer_norm.weight": w})) == ["final_layer_norm.weight"]


def test_vision_root_steps_into_tencent_siglip(tmp_path):
    assert vision_root(tmp_path) == tmp_path
    siglip = tmp_path / "vision_encoder" / "siglip"
    (siglip / "image_encoder").mkdir(parents=True)
    assert vision_root(tmp_path) == siglip
    assert vision_root(tmp_path / "vision_encoder") == siglip
    assert vision_root(siglip) == siglip
