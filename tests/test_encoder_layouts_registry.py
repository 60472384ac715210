import shutil

import pytest
import torch

from hvtune.cache.encoders import encode_caption
from hvtune.cache.keys import TEXT_COMPONENTS, identities
from hvtune.config.schema import TrainConfig
from hvtune.model.registry import ModelSourceError, load_text_encoders, load_vision_encoder, resolve_model
from hvtune.testing.tiny_encoders import write_tiny_tencent_text_root


def test_tencent_ckpts_resolve_and_load(tiny_i2v, tmp_path):
    ckpts = tmp_path / "ckpts"
    write_tiny_tencent_text_root(ckpts / "text_encoder", seed=0)
    for sub in ("image_encoder", "feature_extractor"):
        shutil.copytree(tiny_i2v / sub, ckpts / "vision_encoder" / "siglip" / sub)
    cfg = TrainConfig(pretrained_model_name_or_path=str(tiny_i2v), model_flavour="i2v-480p")
    env = {"HUNYUANVIDEO_TEXT_ENCODER_PATH": str(ckpts), "HUNYUANVIDEO_VISION_ENCODER_PATH": str(ckpts)}
    paths = resolve_model(cfg, env=env)
    assert paths["text_encoder"] == ckpts / "text_encoder" / "llm"
    assert paths["tokenizer_2"] == ckpts / "text_encoder" / "byt5-small"
    assert paths["image_encoder"] == ckpts / "vision_encoder" / "siglip" / "image_encoder"
    assert paths["transformer"] == tiny_i2v / "transformer"
    ids = identities(paths, TEXT_COMPONENTS)
    assert len({i["files_sha256"] for i in ids.values()}) == 3  # llm twice
    enc = load_text_encoders(paths)
    ref = load_text_encoders(resolve_model(cfg, env={}))
    cap = 'a cat holding a sign "hi"'
    a, b = encode_caption(enc, cap, torch.device("cpu")), encode_caption(ref, cap, torch.device("cpu"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_vision_encoder(paths)["image_encoder"].config.hidden_size == 16
    (ckpts / "text_encoder/Glyph-SDXL-v2/checkpoints/byt5_model.pt").unlink()
    with pytest.raises(ModelSourceError) as e:
        resolve_model(cfg, env=env)
    msg = str(e.value)
    print(msg)
    assert "env:HUNYUANVIDEO_TEXT_ENCODER_PATH" in msg and "text_encoder/Glyph-SDXL-v2/checkpoints/byt5_model.pt" in msg
