"""On-disk layouts of a local text-encoder root: diffusers' and Tencent's.

`HUNYUANVIDEO_TEXT_ENCODER_PATH` / `text_encoder_path` may point at either of:

* the **diffusers layout** (the `hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-*` repos): `text_encoder/`
  (Qwen2_5_VLTextModel), `tokenizer/`, `text_encoder_2/` (Glyph ByT5 as a T5EncoderModel, special tokens already
  added), `tokenizer_2/`;
* **Tencent's layout**, what Tencent's `checkpoints-download.md` produces under `ckpts/text_encoder/`:
  `llm/` (a full `Qwen/Qwen2.5-VL-7B-Instruct` snapshot), `byt5-small/` (`google/byt5-small`) and `Glyph-SDXL-v2/`
  (`checkpoints/byt5_model.pt` plus `assets/color_idx.json` and `assets/multilingual_10-lang_idx.json`).
  The parent of that folder (Tencent's `ckpts/`, which holds `text_encoder/llm`, ...) is accepted too.

The vision side needs no second layout: Tencent's `ckpts/vision_encoder/siglip` is FLUX.1-Redux-dev, whose
`image_encoder/` and `feature_extractor/` are already the diffusers names; `vision_root` only steps down from
`ckpts/` or `ckpts/vision_encoder/` to it.

Loading Tencent's layout gives the same four objects the diffusers layout gives (the diffusers conversion script did
exactly this once, offline):

* `text_encoder`: `Qwen2_5_VLTextModel.from_pretrained(llm/)`. The VL checkpoint's keys are `model.*` (legacy) or
  `model.language_model.*` (transformers >= 4.52 layout); a key mapping strips either prefix, the vision tower and
  `lm_head` are left on disk (transformers does not materialise unexpected keys), so the 7B model's ViT is never
  built. Same weights as diffusers' converter (`AutoModel.from_pretrained(...).language_model`), checked in
  tests/test_encoder_layouts.py.
* `tokenizer`: `AutoTokenizer.from_pretrained(llm/, padding_side="right")` as in the converter's `load_mllm`; the
  pipeline crops the first 108 template tokens, which needs right padding.
* `tokenizer_2` / `text_encoder_2`: `google/byt5-small` plus the Glyph colour/font special tokens, embeddings
  resized, then `byt5_model.pt` loaded on top (`load_glyph_byt5`).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from hvtune.errors import UserError
from hvtune.flavours import TEXT
from hvtune.model.component_files import missing_files

DIFFUSERS: Literal["diffusers"] = "diffusers"
TENCENT: Literal["tencent"] = "tencent"
Layout = Literal["diffusers", "tencent"]

LLM = "llm"
BYT5 = "byt5-small"
GLYPH = "Glyph-SDXL-v2"
TENCENT_DIRS = (LLM, BYT5, GLYPH)
GLYPH_CHECKPOINT = "checkpoints/byt5_model.pt"
GLYPH_COLORS = "assets/color_idx.json"
GLYPH_FONTS = "assets/multilingual_10-lang_idx.json"
# Prefix of the ByT5 encoder's keys inside byt5_model.pt's "state_dict" (the Glyph-SDXL-v2 training wrapper).
GLYPH_KEY_PREFIX = "module.text_tower.encoder."
QWEN_MODEL_TYPES = ("qwen2_5_vl", "qwen2_5_vl_text")
# checkpoint key -> Qwen2_5_VLTextModel key: legacy `model.layers.0...` and new `model.language_model.layers.0...`
QWEN_KEY_MAPPING = {r"^model\.(language_model\.)?": ""}
_QWEN_NOT_TEXT = ("visual.", "model.visual.", "lm_head.")  # the VL checkpoint's keys a text model leaves alone

# Files a complete Tencent text root has, relative to it; each entry: alternatives, at least one must exist.
TENCENT_TEXT_FILES: tuple[tuple[str, ...], ...] = (
    (f"{LLM}/config.json",),
    (f"{LLM}/model.safetensors.index.json", f"{LLM}/model.safetensors"),
    (f"{LLM}/tokenizer_config.json",),
    (f"{LLM}/tokenizer.json", f"{LLM}/vocab.json"),
    (f"{BYT5}/config.json",),
    (f"{BYT5}/model.safetensors", f"{BYT5}/model.safetensors.index.json", f"{BYT5}/pytorch_model.bin"),
    (f"{GLYPH}/{GLYPH_CHECKPOINT}",),
    (f"{GLYPH}/{GLYPH_COLORS}",),
    (f"{GLYPH}/{GLYPH_FONTS}",),
)

LAYOUT_HINTS = {
    DIFFUSERS: "expected the diffusers layout: text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/",
    TENCENT: (
        "expected Tencent's layout (checkpoints-download.md): llm/ = Qwen/Qwen2.5-VL-7B-Instruct, "
        "byt5-small/ = google/byt5-small, Glyph-SDXL-v2/ = AI-ModelScope/Glyph-SDXL-v2 "
        "(checkpoints/byt5_model.pt, assets/color_idx.json, assets/multilingual_10-lang_idx.json)"
    ),
}


class EncoderLayoutError(UserError):
    """A local encoder folder is incomplete or holds something else than expected; the message says what."""


# ---------------------------------------------------------------------------------------------------------- layout


def tencent_text_root(root: str | Path) -> Path | None:
    """The folder holding llm/, byt5-small/, Glyph-SDXL-v2/: `root` itself or, for Tencent's `ckpts/`,
    `root/text_encoder` (only when that is not a diffusers `text_encoder/` component). None: not Tencent's layout."""
    root = Path(root).expanduser()
    if any((root / d).is_dir() for d in TENCENT_DIRS):
        return root
    sub = root / "text_encoder"
    if not (sub / "config.json").is_file() and any((sub / d).is_dir() for d in TENCENT_DIRS):
        return sub
    return None


def text_layout(root: str | Path) -> Layout:
    """'tencent' when `root` (or `root/text_encoder`) holds any of llm/, byt5-small/, Glyph-SDXL-v2/; else
    'diffusers' (also for an empty or missing folder: the diffusers check then names what is missing)."""
    return TENCENT if tencent_text_root(root) is not None else DIFFUSERS


def text_component_dirs(root: str | Path, layout: Layout | None = None) -> dict[str, Path]:
    """Folder of each text component. For Tencent's layout: text_encoder and tokenizer -> llm/, text_encoder_2 ->
    Glyph-SDXL-v2/ (the weights and the token lists), tokenizer_2 -> byt5-small/ (the base model): together the four
    folders cover every file the load reads, so a hash over them (cache.keys.component_identity) sees any change, and
    `text_encoder`'s parent is the Tencent text root again (what `text_layout` needs to recognise it)."""
    root = Path(root).expanduser()
    layout = layout or text_layout(root)
    if layout == DIFFUSERS:
        return {name: root / name for name in TEXT}
    t = _require_tencent(root)
    return {"text_encoder": t / LLM, "tokenizer": t / LLM, "text_encoder_2": t / GLYPH, "tokenizer_2": t / BYT5}


def missing_text_files(root: str | Path, layout: Layout | None = None) -> list[str]:
    """What a complete copy in `layout` (default: detected) would have and `root` lacks, relative to `root` as
    given (so `text_encoder/Glyph-SDXL-v2/...` when `root` is Tencent's `ckpts/`). Also names shards that
    llm/model.safetensors.index.json lists but are absent (an interrupted download), and an llm/config.json that
    is not Qwen2.5-VL."""
    root = Path(root).expanduser()
    layout = layout or text_layout(root)
    if layout == DIFFUSERS:
        return missing_files(root, TEXT)
    t = tencent_text_root(root) or root
    rel = "" if t == root else f"{t.relative_to(root).as_posix()}/"
    missing = [f"{rel}{' or '.join(alts)}" for alts in TENCENT_TEXT_FILES if not any((t / a).is_file() for a in alts)]
    index = t / LLM / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            missing.append(f"{rel}{LLM}/model.safetensors.index.json (unreadable: {e})")
        else:
            missing += [f"{rel}{LLM}/{s}" for s in shards if not (t / LLM / s).is_file()]
    config = t / LLM / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except ValueError as e:
            missing.append(f"{rel}{LLM}/config.json (unreadable: {e})")
        else:
            if model_type not in QWEN_MODEL_TYPES:
                missing.append(
                    f"{rel}{LLM}/config.json of Qwen/Qwen2.5-VL-7B-Instruct (this one has model_type {model_type!r})"
                )
    return missing


def text_layout_hint(root: str | Path, layout: Layout | None = None) -> str:
    """What an incomplete `root` was expected to look like, for the error message; a folder that is itself one of
    Tencent's three (most likely the Qwen snapshot) is told to point at the parent instead."""
    root = Path(root).expanduser()
    layout = layout or text_layout(root)
    if layout == DIFFUSERS and root.name in TENCENT_DIRS:
        return (
            f"{root.name}/ is one of the three folders of Tencent's layout: point at its parent, which holds "
            f"{', '.join(d + '/' for d in TENCENT_DIRS)}"
        )
    return LAYOUT_HINTS[layout]


def vision_root(root: str | Path) -> Path:
    """The folder holding image_encoder/ and feature_extractor/: `root`, or Tencent's `root/siglip` or
    `root/vision_encoder/siglip` when `root` lacks image_encoder/ and that one has it. Otherwise `root` unchanged
    (the registry's check then names the missing files)."""
    root = Path(root).expanduser()
    if (root / "image_encoder").is_dir():
        return root
    for sub in (root / "siglip", root / "vision_encoder" / "siglip"):
        if (sub / "image_encoder").is_dir():
            return sub
    return root


def _require_tencent(root: Path) -> Path:
    t = tencent_text_root(root)
    if t is None:
        raise EncoderLayoutError(f"{root} is not a Tencent text-encoder folder; {LAYOUT_HINTS[TENCENT]}")
    return t


# --------------------------------------------------------------------------------------------------------- loading


@contextmanager
def _quiet_transformers():
    """Loading a text model from a VL checkpoint reports the vision tower's ~700 keys as unexpected; we check the
    loading info ourselves instead."""
    from transformers.utils import logging as tlogging

    level = tlogging.get_verbosity()
    tlogging.set_verbosity_error()
    try:
        yield
    finally:
        tlogging.set_verbosity(level)


def load_qwen_text_model(llm: str | Path, dtype=None):
    """`Qwen2_5_VLTextModel` from a full Qwen2.5-VL checkpoint folder, text weights only.

    Equivalent to diffusers' converter (`scripts/convert_hunyuan_video1_5_to_diffusers.py`, `load_mllm`:
    `AutoModel.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct").language_model`) without building the vision tower:
    the text config comes out of the VL config (`Qwen2_5_VLTextConfig.base_config_key = "text_config"`; the hub's
    flat legacy config works too) and QWEN_KEY_MAPPING renames the checkpoint keys."""
    from transformers import Qwen2_5_VLTextModel

    llm = Path(llm)
    with _quiet_transformers():
        model, info = Qwen2_5_VLTextModel.from_pretrained(
            llm, dtype=dtype, key_mapping=QWEN_KEY_MAPPING, output_loading_info=True
        )
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise EncoderLayoutError(
            f"{llm} is not a Qwen2.5-VL checkpoint this text model can load: "
            f"{len(missing)} text weights missing {missing[:3]}, {len(mismatched)} of the wrong shape {mismatched[:3]}"
        )
    return model.eval()


def load_qwen_tokenizer(llm: str | Path):
    """The Qwen tokenizer, right-padded (converter's `load_mllm`). The chat template normally comes with the
    tokenizer files; if only the processor's `chat_template.json` carries it, it is read from there."""
    from transformers import AutoTokenizer

    llm = Path(llm)
    tokenizer = AutoTokenizer.from_pretrained(llm, padding_side="right")
    if not tokenizer.chat_template and (llm / "chat_template.json").is_file():
        tokenizer.chat_template = json.loads((llm / "chat_template.json").read_text())["chat_template"]
    if not tokenizer.chat_template:
        raise EncoderLayoutError(f"{llm}: the tokenizer has no chat template (the pipeline formats prompts with it)")
    return tokenizer


def glyph_special_tokens(glyph: str | Path) -> list[str]:
    """Colour then font tokens, in the order Tencent adds them (multilingual=True, add_color and add_font).

    Copied from Tencent's `add_special_token` (Tencent-Hunyuan/HunyuanVideo-1.5 @910da2a8,
    hyvideo/models/text_encoders/byT5/__init__.py L89, also copied into diffusers'
    scripts/convert_hunyuan_video1_5_to_diffusers.py). The order fixes the new token ids, hence which rows of the
    Glyph checkpoint's embedding belong to which token."""
    glyph = Path(glyph)
    with open(glyph / GLYPH_FONTS, encoding="utf-8") as f:
        idx_font_dict = json.load(f)
    with open(glyph / GLYPH_COLORS, encoding="utf-8") as f:
        idx_color_dict = json.load(f)
    font_tokens = [f"<{font_code[:2]}-font-{idx_font_dict[font_code]}>" for font_code in idx_font_dict]
    color_tokens = [f"<color-{i}>" for i in range(len(idx_color_dict))]
    return color_tokens + font_tokens


def glyph_state_dict(checkpoint) -> dict:
    """byt5_model.pt -> a `T5Stack` (ByT5 encoder) state dict.

    Tencent (HunyuanVideo-1.5 hyvideo/models/text_encoders/byT5/__init__.py, `create_byt5`): if the file has a
    "state_dict", keep only its `module.text_tower.encoder.*` keys, prefix stripped, and load them strictly into
    `T5ForConditionalGeneration.from_pretrained(byt5-small).get_encoder()`; otherwise load the file as is.
    diffusers (scripts/convert_hunyuan_video1_5_to_diffusers.py, `load_byt5`) strips the same prefix and adds
    `encoder.` to load into a T5EncoderModel, allowing only `shared.weight` to be missing (it is tied to
    `encoder.embed_tokens.weight`). Same result; we load into `T5EncoderModel.encoder` strictly."""
    state = checkpoint.get("state_dict", checkpoint)
    wrapped = state is not checkpoint
    out = {}
    for key, value in state.items():
        if key.startswith(GLYPH_KEY_PREFIX):
            out[key[len(GLYPH_KEY_PREFIX) :]] = value
        elif not wrapped:
            out[key] = value
    return out


def load_glyph_byt5(text_root: str | Path, dtype=None) -> tuple:
    """(ByT5Tokenizer, T5EncoderModel): google/byt5-small + Glyph-SDXL-v2's special tokens and weights."""
    import torch
    from transformers import ByT5Tokenizer, T5EncoderModel

    t = Path(text_root)
    byt5, glyph = t / BYT5, t / GLYPH
    tokenizer = ByT5Tokenizer.from_pretrained(byt5)
    with _quiet_transformers():  # byt5-small is a T5ForConditionalGeneration: decoder and lm_head are unexpected
        encoder, info = T5EncoderModel.from_pretrained(byt5, dtype=dtype, output_loading_info=True)
    if info.get("missing_keys"):
        raise EncoderLayoutError(f"{byt5} is not a T5 checkpoint: missing {sorted(info['missing_keys'])[:3]}")
    tokenizer.add_tokens(glyph_special_tokens(glyph), special_tokens=True)
    # mean_resizing=False as Tencent and diffusers do (the new rows are overwritten by the checkpoint anyway)
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    path = glyph / GLYPH_CHECKPOINT
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EncoderLayoutError(f"{path}: cannot read the Glyph ByT5 checkpoint ({type(e).__name__}: {e})") from e
    state = glyph_state_dict(checkpoint)
    try:
        encoder.encoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise EncoderLayoutError(
            f"{path} does not fit {byt5} with the {len(tokenizer)} tokens of it plus {glyph / 'assets'}: {e}"
        ) from e
    if encoder.get_input_embeddings().weight is not encoder.encoder.embed_tokens.weight:  # shared must be tied
        encoder.set_input_embeddings(encoder.encoder.embed_tokens)
    return tokenizer, encoder.eval()


def load_tencent_text_encoders(root: str | Path, dtype=None) -> dict:
    """The four text components from Tencent's layout (`root` = the folder with llm/ ... or Tencent's `ckpts/`),
    the same classes `registry.load_text_encoders` returns for the diffusers layout."""
    t = _require_tencent(Path(root).expanduser())
    missing = missing_text_files(t, TENCENT)
    if missing:
        raise EncoderLayoutError(f"{t} is incomplete; missing {', '.join(missing)} ({LAYOUT_HINTS[TENCENT]})")
    tokenizer_2, text_encoder_2 = load_glyph_byt5(t, dtype)
    return {
        "tokenizer": load_qwen_tokenizer(t / LLM),
        "text_encoder": load_qwen_text_model(t / LLM, dtype),
        "tokenizer_2": tokenizer_2,
        "text_encoder_2": text_encoder_2,
    }
