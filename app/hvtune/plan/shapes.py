"""The training batch `hvtune plan` simulates: its shape as the transformer sees it, from the config's datasets.

The bucket is the largest the user's clips give (plan/dataset.py says where those come from); without clips, the
largest bucket the datasets give the usual aspects. The caption length is the longest text entry of a built cache
that matches the config; without one, `CAPTION_TOKENS` (or what the caller names)."""

from __future__ import annotations

from dataclasses import dataclass

from hvtune.config.settings import ResolvedConfig
from hvtune.model.architectures import IMAGE_TOKENS, latent_shape
from hvtune.plan.dataset import PlannedData, cached_caption_tokens, planned_data

CAPTION_TOKENS = 256  # Qwen tokens per caption assumed when no cache says otherwise (template + a long caption)


class VideoSize:
    """What a video's width, height and frames give the transformer: its latent shape and video tokens (for the
    dataclasses below that hold those three)."""

    width: int
    height: int
    frames: int

    @property
    def latents(self) -> tuple[int, int, int, int]:
        return latent_shape(self.frames, self.height, self.width)

    @property
    def video_tokens(self) -> int:
        _, f, h, w = self.latents
        return f * h * w


@dataclass(frozen=True)
class StepShape(VideoSize):
    """One training batch as the transformer sees it."""

    batch: int
    frames: int
    width: int
    height: int
    task: str
    qwen_tokens: int = CAPTION_TOKENS
    byt5_tokens: int = 0
    source: str = ""  # where the bucket came from, as the plan prints it
    tokens_source: str = ""  # where the caption length came from

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
    """(W, H, F) of the largest bucket the datasets can produce for clips of the PLANNED_ASPECTS (the fallback when
    no clips are found): the most pixels over the buckets SimpleTuner's rule gives each dataset, at its longest frame
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


def caption_tokens_for(resolved: ResolvedConfig, caption_tokens: int | None) -> tuple[int, int, str]:
    """(Qwen tokens, ByT5 tokens, where from): the caller's number when given, else a matching cache's longest
    text entry, else CAPTION_TOKENS."""
    if caption_tokens is not None:
        return caption_tokens, 0, f"{caption_tokens} caption tokens as given"
    qwen, byt5, where = cached_caption_tokens(resolved)
    if qwen:
        return qwen, byt5, f"{qwen} Qwen + {byt5} ByT5 caption tokens: {where}"
    return CAPTION_TOKENS, 0, f"{CAPTION_TOKENS} caption tokens assumed ({where})"


def shape_for(
    resolved: ResolvedConfig, caption_tokens: int | None = None, data: PlannedData | None = None
) -> StepShape:
    """The largest batch training will meet: the largest bucket of the user's data (`data`, read when not given),
    with the longest caption (`caption_tokens` when given)."""
    data = data if data is not None else planned_data(resolved)
    bucket = data.largest_bucket
    w, h, f = bucket if bucket is not None else largest_bucket(resolved)
    qwen, byt5, tokens_source = caption_tokens_for(resolved, caption_tokens)
    return StepShape(
        batch=resolved.train.train_batch_size,
        frames=f,
        width=w,
        height=h,
        task=resolved.task,
        qwen_tokens=qwen,
        byt5_tokens=byt5,
        source=data.describe(),
        tokens_source=tokens_source,
    )


def shape_lines(shape: StepShape) -> list[str]:
    """What the plan prints under its first line: where the bucket and the caption length came from."""
    return [f"  bucket {shape.width}x{shape.height}x{shape.frames}f: {shape.source}", f"  {shape.tokens_source}"]
