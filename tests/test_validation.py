"""The validation sampler is the diffusers pipeline's loop: same video for the same embeddings and seed."""

from __future__ import annotations

import torch
from diffusers import HunyuanVideo15Pipeline

from hvtune.output.validation import TextCondition, sample_video


def test_sampler_matches_diffusers_pipeline_t2v(tiny_t2v):
    pipe = HunyuanVideo15Pipeline.from_pretrained(tiny_t2v)
    prompt = TextCondition(*pipe.encode_prompt('a red ball rolls past a sign that says "HI"', device="cpu"))
    negative = TextCondition(*pipe.encode_prompt("", device="cpu"))
    kwargs = dict(height=64, width=96, num_frames=9, num_inference_steps=3)
    reference = pipe(
        prompt_embeds=prompt.embeds,
        prompt_embeds_mask=prompt.mask,
        prompt_embeds_2=prompt.embeds_2,
        prompt_embeds_mask_2=prompt.mask_2,
        negative_prompt_embeds=negative.embeds,
        negative_prompt_embeds_mask=negative.mask,
        negative_prompt_embeds_2=negative.embeds_2,
        negative_prompt_embeds_mask_2=negative.mask_2,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="np",
        **kwargs,
    ).frames[0]

    def ours(seed: int) -> torch.Tensor:
        scale = pipe.guider.guidance_scale
        return sample_video(
            pipe.transformer, pipe.vae, pipe.scheduler, prompt=prompt, negative=negative, guidance_scale=scale,
            seed=seed, **kwargs,
        )  # fmt: skip

    video = ours(3)
    assert video.shape == (9, 3, 64, 96) and video.dtype == torch.uint8
    expected = torch.from_numpy(reference).permute(0, 3, 1, 2) * 255
    assert (video.float() - expected).abs().max() <= 1.0  # equal up to uint8 rounding
    assert not torch.equal(video, ours(4))
