"""The training batch `hvtune plan` simulates: its shape as the transformer sees it, from the config's datasets."""

from __future__ import annotations

from dataclasses import dataclass

from hvtune.config.settings import ResolvedConfig
from hvtune.model.architectures import IMAGE_TOKENS, latent_shape

CAPTION_TOKENS = 256  # Qwen tokens per caption assumed when no cache says otherwise (template + a long caption)


@dataclass(frozen=True)
class StepShape:
    """One training batch as the transformer sees it."""

    batch: int
    frames: int
    width: int
    height: int
    task: str
    qwen_tokens: int = CAPTION_TOKENS
    byt5_tokens: int = 0

    @property
    def latents(self) -> tuple[int, int, int, int]:
        return latent_shape(self.frames, self.height, self.width)

    @property
    def video_tokens(self) -> int:
        _, f, h, w = self.latents
        return f * h * w

    @property
    def image_tokens(self) -> int:
        return IMAGE_TOKENS if self.task == "i2v" else 0

    @property
    def seq_len(self) -> int:
        return self.video_tokens + self.qwen_tokens + self.byt5_tokens + self.image_tokens

    def label(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}f, batch {self.batch}"


# the clip shapes a plan assumes: it does not read the data, so it takes the largest bucket of the usual ones
PLANNED_ASPECTS = ((16, 9), (9, 16), (4, 3), (3, 4), (1, 1))


def largest_bucket(resolved: ResolvedConfig) -> tuple[int, int, int]:
    """(W, H, F) of the largest bucket the datasets can produce: the most pixels over the buckets SimpleTuner's rule
    gives each dataset for clips of the PLANNED_ASPECTS (the data's own aspects are not read), at its longest frame
    count."""
    from hvtune.data.buckets import dataset_bucket_rule, interval_frames, simpletuner_bucket
    from hvtune.data.datasets import media_datasets

    best = None
    for ds in media_datasets(resolved):
        rule = dataset_bucket_rule(ds, resolved)
        sizes = {simpletuner_bucket(120 * w, 120 * h, rule) for w, h in PLANNED_ASPECTS}
        v = ds.video
        frames = 1 if ds.dataset_type == "image" else v.num_frames
        if ds.dataset_type == "video" and v.bucket_strategy == "resolution_frames":
            frames = interval_frames(v.num_frames, v.frame_interval)
        for w, h in sizes:
            key = (w * h * ((frames - 1) // 4 + 1), w, h, frames)
            best = key if best is None or key > best else best
    if best is None:
        w, h = resolved.train.flavour.resolution
        return w, h, 61
    return best[1], best[2], best[3]


def shape_for(resolved: ResolvedConfig, caption_tokens: int = CAPTION_TOKENS) -> StepShape:
    w, h, f = largest_bucket(resolved)
    return StepShape(
        batch=resolved.train.train_batch_size,
        frames=f,
        width=w,
        height=h,
        task=resolved.task,
        qwen_tokens=caption_tokens,
    )
