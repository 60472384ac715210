"""A tiny, randomly initialised HunyuanVideo 1.5 pipeline for tests, CI and the demo.

Same diffusers/transformers classes as the real model, saved in the same diffusers on-disk layout, so the registry
and everything after it load it through the code path the 8.3B model takes. Kept real where it costs little:
32 latent channels, 65 transformer input channels, 16x spatial / 4x temporal VAE compression, a 3-layer Qwen text
model (the pipeline reads hidden_states[-3]), offline byte-level tokenizers. Byte-identical for the same seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from hvtune.files import atomic_directory
from hvtune.model.architectures import LATENT_CHANNELS, TINY_TRANSFORMER_CONFIG

QWEN_HIDDEN = TINY_TRANSFORMER_CONFIG["text_embed_dim"]
BYT5_HIDDEN = TINY_TRANSFORMER_CONFIG["text_embed_2_dim"]
SIGLIP_HIDDEN = TINY_TRANSFORMER_CONFIG["image_embed_dim"]

# Minimal Qwen2-style chat template (string content only, which is what the pipeline passes).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _qwen_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for tok in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[tok] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], chat_template=QWEN_CHAT_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def _text_encoder():
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    config = Qwen2_5_VLTextConfig(
        vocab_size=300,
        hidden_size=QWEN_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_scaling={"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
        rope_theta=1000000.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return Qwen2_5_VLTextModel(config).eval()


def _text_encoder_2():
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=384,  # ByT5: 3 special + 256 bytes + 125 extra ids
        d_model=BYT5_HIDDEN,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config).eval()


def _vae():
    from diffusers import AutoencoderKLHunyuanVideo15

    return AutoencoderKLHunyuanVideo15(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(16, 16, 32, 32, 64),  # last >= 2 x latent channels,
        layers_per_block=1,
        spatial_compression_ratio=16,
        temporal_compression_ratio=4,
        downsample_match_channel=True,
        upsample_match_channel=True,
    ).eval()


def _image_encoder():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=SIGLIP_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    return SiglipVisionModel(config).eval()


def build_components(task: Literal["t2v", "i2v"] = "t2v", seed: int = 0, num_layers: int = 2) -> dict:
    """The pipeline's components; each model's weights drawn from the global RNG seeded `seed * 1000 + its number`."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideo15Transformer3DModel
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer, SiglipImageProcessor

    def seeded(offset: int, build):
        torch.manual_seed(seed * 1000 + offset)
        return build()

    text_encoder = seeded(1, _text_encoder)
    text_encoder_2 = seeded(2, _text_encoder_2)
    transformer = seeded(
        3,
        lambda: HunyuanVideo15Transformer3DModel(
            **dict(TINY_TRANSFORMER_CONFIG, num_layers=num_layers, task_type=task)
        ),
    )
    vae = seeded(4, _vae)
    components = dict(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        text_encoder=text_encoder,
        tokenizer=_qwen_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=ByT5Tokenizer(),
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
    if task == "i2v":
        components["image_encoder"] = seeded(5, _image_encoder)
        components["feature_extractor"] = SiglipImageProcessor(size={"height": 32, "width": 32})
    return components


def write_tiny_model(out: str | Path, task: Literal["t2v", "i2v"] = "t2v", seed: int = 0) -> Path:
    """Write the tiny pipeline to `out` (atomically: built in a temp dir beside it, then renamed)."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Pipeline

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pipeline_cls = HunyuanVideo15ImageToVideoPipeline if task == "i2v" else HunyuanVideo15Pipeline
    pipe = pipeline_cls(**build_components(task, seed))
    with atomic_directory(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out
