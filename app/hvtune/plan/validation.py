"""`hvtune plan`'s validation round: the validation-sized transformer forward and the VAE decode on meta tensors.

The trainer validates (`output.validation.render_validation`) after the last step and every `validation_steps`
unless `validation_disable`: the LoRA-injected transformer, with the optimizer's state still on the GPU and the VAE's
decoder loaded beside it (in `vae_dtype`, bf16 by default: `output.vae_decode.ValidationVAE`), samples a video of
`validation_resolution` x `validation_num_video_frames` (`sample_video`: per sampling step one forward without
gradients, two with classifier-free guidance), then the decoder decodes the latents, tiled unless
`vae_enable_tiling` is false; with `enable_model_cpu_offload` the transformer leaves the GPU for the decode.

Plan runs `sample_video` itself: the transformer prepared as for the step (`simulate.prepare_step`), the real VAE
architecture (`architectures.VAE_CONFIG`), one sampling step (every step allocates the same; only the latents carry
over), under the same TensorTracker; the decode then runs once more with tiling the other way, so the report can say
what `vae_enable_tiling` changes. Two things are accounted instead of run on meta:
- moving the transformer to the CPU for the decode would need its data: the decode runs with it on the device and
  the plan takes its bytes out (`prediction.Plan.validation_decode`);
- the VAE's causal attention mask is written row by row in Python (one slice fill per token: 25,440 at 480p x 61
  frames), values meta does not need: `causal_mask_in_one_op` allocates the same (S, S) tensor in one op there.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from hvtune.config.settings import TrainConfig
from hvtune.model.architectures import IMAGE_TOKENS, VAE_CONFIG, transformer_config
from hvtune.plan.autocast import MetaAutocast
from hvtune.plan.shapes import StepShape, VideoSize
from hvtune.plan.simulate import build_meta_transformer, prepare_step, state_tensors
from hvtune.plan.tracker import TensorTracker


@dataclass(frozen=True)
class ValidationShape(VideoSize):
    """One validation video as the transformer and the VAE see it."""

    width: int
    height: int
    frames: int
    task: str
    qwen_tokens: int
    guidance: float  # > 1: classifier-free guidance, two forwards per sampling step
    steps: int  # sampling steps (time only: each allocates the same)

    def label(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}f"


def validation_shape(cfg: TrainConfig, training: StepShape) -> ValidationShape | None:
    """The validation video the trainer renders for `cfg`, or None when it renders none. i2v with
    `validation_using_datasets` also renders training samples at their own size: the larger of the two is planned."""
    from hvtune.output.validation import validation_due

    if not validation_due(cfg, 0, 1, final=True):  # the trainer's own test (the last step always validates)
        return None
    width, height = cfg.validation_size
    if training.task == "i2v" and cfg.validation_using_datasets and training.width * training.height > width * height:
        width, height = training.width, training.height
    return ValidationShape(
        width,
        height,
        cfg.validation_num_video_frames,
        training.task,
        training.qwen_tokens,
        cfg.validation_guidance,
        cfg.validation_num_inference_steps,
    )


@dataclass
class ValidationMemory:
    """Tracked bytes of one validation round, with the whole transformer on the device (offload is the plan's)."""

    shape: ValidationShape
    tiling: bool  # the decode's tiling as the trainer runs it (`vae_decode.decode_tiling`: unset tiles)
    resident: int  # at its start: transformer weights (base + LoRA), optimizer state, VAE weights
    transformer_weights: int
    vae_weights: int
    forward_peak: int  # while the transformer samples
    decode_peaks: dict[bool, int]  # VAE tiling on/off -> peak while the VAE decodes (and the frames are made)
    seconds: float
    dtype: str = "float32"  # the VAE decoder's

    @property
    def forward_extra(self) -> int:
        """What the forward adds to the resident bytes: activations (no gradients), latents, conditions."""
        return self.forward_peak - self.resident

    def decode_extra(self, tiling: bool | None = None) -> int:
        """What the decode adds to the resident bytes, with tiling as configured or as given."""
        return self.decode_peaks[self.tiling if tiling is None else tiling] - self.resident


@contextlib.contextmanager
def causal_mask_in_one_op():
    """diffusers' `HunyuanVideo15AttnBlock.prepare_causal_attention_mask` fills its (S, S) mask one row at a time (S
    Python iterations); on meta the values are not needed, so the same tensor is allocated by one op there. The
    allocation is the same; the fills allocate nothing. Real tensors keep diffusers' function."""
    import torch
    from diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15 import HunyuanVideo15AttnBlock

    original = HunyuanVideo15AttnBlock.__dict__["prepare_causal_attention_mask"]

    def prepare(n_frame: int, n_hw: int, dtype, device, batch_size: int | None = None):
        if torch.device(device).type != "meta":
            return original.__func__(n_frame, n_hw, dtype, device, batch_size)
        mask = torch.full((n_frame * n_hw, n_frame * n_hw), float("-inf"), dtype=dtype, device=device)
        return mask if batch_size is None else mask.unsqueeze(0).expand(batch_size, -1, -1)

    HunyuanVideo15AttnBlock.prepare_causal_attention_mask = staticmethod(prepare)
    try:
        yield
    finally:
        HunyuanVideo15AttnBlock.prepare_causal_attention_mask = original


class _DecodeWatch:
    """Splits the round at the VAE's decode: the peak before it (the sampling) and the peak from it on."""

    def __init__(self, tracker: TensorTracker, vae):
        self.forward_peak: int | None = None
        self.vae = vae
        decode = vae.decode

        def watched(*args, **kwargs):
            if self.forward_peak is None:
                self.forward_peak = tracker.peak
            tracker.reset_peak()
            with tracker.without_values() if tracker.shadows is not None else contextlib.nullcontext():
                return decode(*args, **kwargs)

        vae.decode = watched

    def close(self) -> None:
        del self.vae.decode


def _conditions(model_config: dict, shape: ValidationShape, seed: int = 0):
    """(prompt, negative prompt or None, i2v image condition or None) with the cache's shapes, as CPU tensors."""
    import torch

    from hvtune.output.validation import ImageCondition, TextCondition

    g = torch.Generator().manual_seed(seed)

    def text() -> TextCondition:  # the negative prompt is planned as long as the prompt (its forward is not larger)
        n = shape.qwen_tokens
        embeds = torch.randn(1, n, model_config["text_embed_dim"], generator=g)
        return TextCondition(
            embeds,
            torch.ones(1, n, dtype=torch.int64),
            torch.zeros(1, 0, model_config["text_embed_2_dim"]),
            torch.ones(1, 0, dtype=torch.int64),
        )

    image = None
    if shape.task == "i2v":
        c, _, h, w = shape.latents
        image = ImageCondition(
            torch.randn(1, c, 1, h, w, generator=g),
            torch.randn(1, IMAGE_TOKENS, model_config["image_embed_dim"], generator=g),
        )
    return text(), text(), image


def run_validation(
    transformer, vae, cfg: TrainConfig, shape: ValidationShape, *, device: str, state
) -> ValidationMemory:
    """One validation round (`sample_video`, one sampling step) on `transformer` (prepared as for training, on
    `device`, `state` its optimizer's state) and `vae` (fresh, on `device`) under a TensorTracker; then the decode
    alone with tiling the other way."""
    started = time.perf_counter()
    meta = device == "meta"
    tracker = TensorTracker(device, shadows=meta)
    tracker.adopt([*transformer.parameters(), *transformer.buffers()])
    transformer_weights = tracker.current
    tracker.adopt(state)
    vae_start = tracker.current
    tracker.adopt([*vae.parameters(), *vae.buffers()])
    resident = tracker.current
    from hvtune.output.vae_decode import decode_tiling

    tiling = decode_tiling(cfg)
    dtype = str(next(vae.parameters()).dtype).removeprefix("torch.")
    memory = ValidationMemory(shape, tiling, resident, transformer_weights, resident - vae_start, 0, {}, 0, dtype)
    transformer.eval()  # as render_validation: no LoRA dropout
    conditions = _conditions(dict(transformer.config), shape)  # read from the cache: CPU tensors, untracked
    watch = _DecodeWatch(tracker, vae)
    meta_contexts = (MetaAutocast(enabled=False), causal_mask_in_one_op()) if meta else ()
    try:
        with tracker, contextlib.ExitStack() as stack:
            for context in meta_contexts:
                stack.enter_context(context)
            for tiled in (tiling, not tiling):
                vae.enable_tiling() if tiled else vae.disable_tiling()
                tracker.reset_peak()
                _sample_or_decode(transformer, vae, shape, device, conditions if tiled == tiling else None)
                memory.decode_peaks[tiled] = tracker.peak
    finally:
        watch.close()
    memory.forward_peak = watch.forward_peak or 0
    memory.seconds = time.perf_counter() - started
    return memory


def _sample_or_decode(transformer, vae, shape: ValidationShape, device: str, conditions: tuple | None) -> None:
    """The round as the trainer runs it (`sample_video` with one sampling step; the transformer stays where it is:
    the plan accounts for enable_model_cpu_offload), or without `conditions` only its decode (`decode_latents`) of
    latents of the same shape."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from hvtune.output.validation import decode_latents, sample_video

    if conditions is None:
        dtype = next(p.dtype for p in transformer.parameters() if p.dtype.is_floating_point)
        latents = torch.zeros((1, *shape.latents), dtype=dtype, device=device)
        with torch.no_grad():
            decode_latents(transformer, vae, latents, device, False)
        return
    prompt, negative, image = conditions
    sample_video(
        transformer,
        vae,
        FlowMatchEulerDiscreteScheduler(),
        prompt=prompt,
        negative=negative,
        width=shape.width,
        height=shape.height,
        num_frames=shape.frames,
        num_inference_steps=1,
        guidance_scale=shape.guidance,
        seed=0,
        image=image,
        device=device,
        offload_transformer_for_decode=False,
    )


def build_meta_vae(vae_config: dict, dtype: str = "float32"):
    """The VAE as validation loads it (`registry.load_vae_decoder`): its decoder alone, in `dtype`, on meta."""
    import torch

    with torch.device("meta"):
        return decoder_only(vae_config, dtype)


def decoder_only(vae_config: dict, dtype: str):
    import torch
    from diffusers import AutoencoderKLHunyuanVideo15

    vae = AutoencoderKLHunyuanVideo15.from_config(vae_config).eval()
    vae.encoder = None
    # nn.Module.to: diffusers' own `to` warns about modules to keep in float32, and this VAE lists none
    return torch.nn.Module.to(vae, getattr(torch, dtype))


def simulate_validation(cfg: TrainConfig, training: StepShape) -> ValidationMemory | None:
    """The validation round of `cfg` at full size on meta, or None when validation is off."""
    shape = validation_shape(cfg, training)
    if shape is None:
        return None
    from hvtune.model.registry import vae_dtype_name

    transformer = build_meta_transformer(transformer_config(cfg.model_flavour))
    _, _, optimizer = prepare_step(transformer, cfg, "meta")
    vae = build_meta_vae(VAE_CONFIG, vae_dtype_name(cfg, on_gpu=True))  # plan predicts the GPU's round
    return run_validation(transformer, vae, cfg, shape, device="meta", state=state_tensors(optimizer))


def compare_validation_with_cpu(
    model_config: dict, vae_config: dict, cfg: TrainConfig, shape: ValidationShape
) -> tuple[ValidationMemory, ValidationMemory]:
    """(predicted, measured): the same validation round of a (small) architecture on meta and for real on the CPU,
    both measured by the TensorTracker."""
    import torch
    from diffusers import HunyuanVideo15Transformer3DModel

    transformer = build_meta_transformer(model_config)
    _, _, optimizer = prepare_step(transformer, cfg, "meta")
    meta_vae = build_meta_vae(vae_config)
    predicted = run_validation(transformer, meta_vae, cfg, shape, device="meta", state=state_tensors(optimizer))
    torch.manual_seed(0)
    real = HunyuanVideo15Transformer3DModel(**model_config)
    _, _, optimizer = prepare_step(real, cfg, "cpu")
    vae = decoder_only(vae_config, "float32")  # the CPU decodes in float32 (registry.vae_dtype_name)
    measured = run_validation(real, vae, cfg, shape, device="cpu", state=state_tensors(optimizer))
    return predicted, measured
