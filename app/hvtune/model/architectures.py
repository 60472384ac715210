"""The real full-size architecture of each flavour, the analytic FLOP model, and the GPUs hvtune knows.

No weights here: the transformer's config is enough to build the 8.3B model on PyTorch's meta device (`hvtune plan`)
or with random weights on a GPU (`benchmarks/bench_gpu.py`); `TINY_TRANSFORMER_CONFIG` is the same architecture shrunk
for the tests, the demo and the benchmarks' CPU runs.

`TRANSFORMER_CONFIG` is diffusers' own `TRANSFORMER_CONFIGS["480p_t2v"]` from huggingface/diffusers
scripts/convert_hunyuan_video1_5_to_diffusers.py (also the class defaults of `HunyuanVideo15Transformer3DModel` in
diffusers 0.42.1): 54 dual-stream blocks, 16 heads x 128 = hidden 2048, mlp_ratio 4, 2 refiner blocks, patch 1x1x1,
text_embed_dim 3584 (Qwen2.5-VL-7B), text_embed_2_dim 1472 (ByT5-small glyph), image_embed_dim 1152 (SigLIP),
rope_axes_dim (16, 56, 56), rope_theta 256. The four flavours differ only in `target_size` (640 at 480p, 960 at 720p)
and `task_type`; the parameter count is the same (8,326,608,160 with `image_embed_dim` 1152). `VAE_CONFIG` is the
video VAE's, the same for every flavour.
"""

from __future__ import annotations

from dataclasses import dataclass

from hvtune.flavours import FLAVOURS

TRANSFORMER_CONFIG = dict(
    in_channels=65,  # noisy latents 32 + condition latents 32 + mask 1
    out_channels=32,
    num_attention_heads=16,
    attention_head_dim=128,
    num_layers=54,
    num_refiner_layers=2,
    mlp_ratio=4.0,
    patch_size=1,
    patch_size_t=1,
    qk_norm="rms_norm",
    text_embed_dim=3584,
    text_embed_2_dim=1472,
    image_embed_dim=1152,
    rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
    use_meanflow=False,
    target_size=640,
    task_type="t2v",
)
# The same architecture at a size a CPU runs in milliseconds: the transformer of the tiny test model
# (`hvtune.testing.tiny_model`; its text encoders are 32 wide, its SigLIP 16) and, with wider heads, the GPU
# benchmark's --cpu-smoke model.
TINY_TRANSFORMER_CONFIG = dict(TRANSFORMER_CONFIG, num_attention_heads=2, attention_head_dim=16, num_layers=2)
TINY_TRANSFORMER_CONFIG.update(num_refiner_layers=1, mlp_ratio=2.0, rope_axes_dim=(4, 6, 6), target_size=64)
TINY_TRANSFORMER_CONFIG.update(text_embed_dim=32, text_embed_2_dim=32, image_embed_dim=16)  # the encoders' widths
LATENT_CHANNELS, VAE_SPATIAL, VAE_TEMPORAL = 32, 16, 4
# The video VAE (`AutoencoderKLHunyuanVideo15`, 1,260,634,115 parameters, 871,309,571 of them in the decoder):
# diffusers' convert_hunyuan_video1_5_to_diffusers.py `convert_vae` builds it with the class defaults, which are these
# (FastVideo's Hunyuan15VAEArchConfig has the same values). Validation loads it in float32 (`registry.load_vae`).
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=LATENT_CHANNELS,
    block_out_channels=(128, 256, 512, 1024, 1024),
    layers_per_block=2,
    spatial_compression_ratio=VAE_SPATIAL,
    temporal_compression_ratio=VAE_TEMPORAL,
    downsample_match_channel=True,
    upsample_match_channel=True,
    scaling_factor=1.03682,
)
# SigLIP tokens per image (the i2v condition): 27 x 27 patches of 14 px at 384 px
IMAGE_TOKENS = 729


class UnknownArchitecture(ValueError):
    pass


def transformer_config(flavour: str) -> dict:
    """The diffusers config of the flavour's transformer (kwargs of `HunyuanVideo15Transformer3DModel`)."""
    if flavour not in FLAVOURS:
        raise UnknownArchitecture(f"no known architecture for model_flavour {flavour!r}; one of {sorted(FLAVOURS)}")
    spec = FLAVOURS[flavour]
    return dict(TRANSFORMER_CONFIG, target_size=spec.target_size, task_type=spec.task)


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """VAE: 32 channels, 4x causal temporal (4n+1 frames -> n+1), 16x spatial."""
    if (frames - 1) % VAE_TEMPORAL:
        raise ValueError(f"frames must be 4n+1, got {frames}")
    return LATENT_CHANNELS, (frames - 1) // VAE_TEMPORAL + 1, height // VAE_SPATIAL, width // VAE_SPATIAL


def forward_flops(cfg: dict, n_video: int, n_qwen: int, n_byt5: int, n_image: int, batch: int = 1) -> dict:
    """Matmul FLOPs of one forward pass (multiply-add = 2), per component.

    Per token and per block, each stream (video tokens through the image stream, text and image-condition tokens
    through the context stream) does 2*(4 + 2*mlp_ratio)*d^2 = 24*d^2 FLOPs (q, k, v, out and the 4x MLP); the joint
    attention does 4*S^2*d per block (QK^T and PV over the whole sequence S); plus the token refiner, the embedders
    and proj_out. A training step is 3 x forward (backward = 2 x forward, the usual MFU convention); gradient
    checkpointing adds one more forward of the blocks (`train_step_flops`)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    layers, r = cfg["num_layers"], cfg["mlp_ratio"]
    per_token_block = 2 * (4 + 2 * r) * d * d  # q, k, v, out + MLP d -> r*d -> d, one stream
    n_text = n_qwen + n_byt5 + n_image
    seq = n_video + n_text
    patch = cfg["patch_size_t"] * cfg["patch_size"] ** 2
    parts = {
        "blocks_linear": layers * per_token_block * seq,
        "attention": layers * 4 * seq * seq * d,
        "modulation": layers * 2 * 2 * d * 6 * d + 2 * d * 2 * d,  # adaLN-zero of both streams + norm_out, per sample
        "refiner": cfg["num_refiner_layers"] * (per_token_block * n_qwen + 4 * n_qwen * n_qwen * d)
        + 2 * cfg["text_embed_dim"] * d * n_qwen,
        "byt5_projection": 2 * (cfg["text_embed_2_dim"] * 2048 + 2048 * 2048 + 2048 * d) * n_byt5,
        "image_projection": 2 * (cfg["image_embed_dim"] ** 2 + cfg["image_embed_dim"] * d) * n_image,
        "patch_embed_and_out": 2 * (cfg["in_channels"] + cfg["out_channels"]) * patch * d * n_video,
    }
    parts = {k: v * batch for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    parts["seq_len"] = seq
    return parts


def train_step_flops(forward: dict, *, gradient_checkpointing: bool) -> float:
    """Forward + backward (2x forward), + the blocks' recomputed forward under gradient checkpointing."""
    recompute = forward["blocks_linear"] + forward["attention"] if gradient_checkpointing else 0
    return 3 * forward["total"] + recompute


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # what torch.cuda.get_device_properties(0).total_memory reports, in GiB
    bf16_tflops: (
        float | None
    )  # dense bf16 tensor peak, fp32 accumulation (vendor spec sheets, no sparsity); None: unknown
    host_link_gbps: float  # host <-> device bandwidth a group-offload copy gets, GB/s (PCIe gen or NVLink-C2C)
    match: tuple[str, ...]  # substrings of the CUDA device name, lower case


# First match on the device name wins, so the more specific names come first.
GPUS: tuple[GPU, ...] = (
    GPU("RTX 3090", 24.0, 71.0, 25.0, ("rtx 3090",)),
    GPU("RTX 4090", 23.99, 165.2, 25.0, ("rtx 4090",)),
    GPU("RTX 5090", 31.84, 209.5, 50.0, ("rtx 5090",)),
    GPU("L40S", 44.99, 362.0, 25.0, ("l40s",)),
    GPU("A100 40GB", 39.39, 312.0, 25.0, ("a100-sxm4-40gb", "a100-pcie-40gb", "a100 40")),
    GPU("A100 80GB", 79.25, 312.0, 25.0, ("a100",)),
    GPU("H100 PCIe", 79.19, 756.0, 50.0, ("h100 pcie",)),
    GPU("H100 NVL", 93.1, 835.0, 50.0, ("h100 nvl",)),
    GPU("H100", 79.19, 989.0, 50.0, ("h100", "h800")),
    GPU("H200", 139.8, 989.0, 50.0, ("gh200", "h200")),
    GPU("B200", 178.4, 2250.0, 50.0, ("b200",)),
    GPU("MI300X", 191.98, 1307.0, 50.0, ("mi300x",)),
)


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("nvidia", "").replace("geforce", "").replace("amd", "").split())


def find_gpu(name: str) -> GPU | None:
    """A known card by its name as users write it ("4090", "RTX 4090", "A100 80") or as CUDA reports it
    ("NVIDIA GeForce RTX 4090", "NVIDIA A100-SXM4-80GB")."""
    wanted = _norm(name)
    for gpu in GPUS:
        if wanted == _norm(gpu.name) or wanted.replace(" ", "") == _norm(gpu.name).replace(" ", ""):
            return gpu
    for gpu in GPUS:
        if any(m in wanted for m in gpu.match) or (len(wanted) >= 3 and wanted in _norm(gpu.name)):
            return gpu
    return None


def peak_bf16_tflops(device_name: str) -> float | None:
    gpu = find_gpu(device_name)
    return gpu.bf16_tflops if gpu else None
