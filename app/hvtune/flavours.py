"""What each flavour and each task of HunyuanVideo 1.5 decides, in one table: a new flavour is one `FLAVOURS` entry,
a new task one `TASKS` entry plus the stage code that reads its fields.

A task says which model components it needs and whether the first frame conditions the video (i2v: the cache holds
its condition latent and SigLIP embedding, batches carry them, validation renders with them). A flavour is a task at
a resolution: its default video size, Tencent's inference shift, the diffusers-layout repo the model comes from and
the transformer's `target_size`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The hub id a config names by default (Tencent's original format); hvtune fetches the same weights in diffusers
# layout from the flavour's `diffusers_repo` instead.
MODEL_REPO = "tencent/HunyuanVideo-1.5"

# Model components (each a subfolder of the diffusers layout), grouped by where they may come from.
CORE = ("transformer", "vae", "scheduler")
TEXT = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
VISION = ("image_encoder", "feature_extractor")

Task = Literal["t2v", "i2v"]


@dataclass(frozen=True)
class TaskSpec:
    name: Task
    image_condition: bool  # the first frame conditions the video: condition latents and SigLIP image embeddings

    @property
    def components(self) -> tuple[str, ...]:
        """Every model component the task loads: the base model, the text encoders, and SigLIP for an image."""
        return (*CORE, *TEXT, *(VISION if self.image_condition else ()))

    @property
    def encoders(self) -> tuple[str, ...]:
        """The components its cache is encoded with, in the order their identities enter the cache keys."""
        return (*TEXT, "vae", *(VISION if self.image_condition else ()))


TASKS: dict[str, TaskSpec] = {
    "t2v": TaskSpec("t2v", image_condition=False),
    "i2v": TaskSpec("i2v", image_condition=True),
}


@dataclass(frozen=True)
class FlavourSpec:
    name: str
    task: Task
    resolution: tuple[int, int]  # (width, height), multiples of 16: default dataset and validation size
    flow_shift: float  # Tencent's inference shift (the pipeline's); training uses flow_schedule_shift (default 3.0)
    target_size: int  # the transformer config's target_size (diffusers' TRANSFORMER_CONFIGS)
    diffusers_repo: str  # the community conversion holding this flavour in diffusers layout

    @property
    def image_condition(self) -> bool:
        return TASKS[self.task].image_condition

    @property
    def components(self) -> tuple[str, ...]:
        return TASKS[self.task].components


_COMMUNITY = "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers"
# in the order `model_flavour`'s error message lists them
FLAVOURS: dict[str, FlavourSpec] = {
    f.name: f
    for f in (
        FlavourSpec("t2v-480p", "t2v", (848, 480), 5.0, 640, f"{_COMMUNITY}-480p_t2v"),
        FlavourSpec("t2v-720p", "t2v", (1280, 720), 9.0, 960, f"{_COMMUNITY}-720p_t2v"),
        FlavourSpec("i2v-480p", "i2v", (848, 480), 5.0, 640, f"{_COMMUNITY}-480p_i2v"),
        FlavourSpec("i2v-720p", "i2v", (1280, 720), 7.0, 960, f"{_COMMUNITY}-720p_i2v"),
    )
}
DEFAULT_FLAVOUR = "t2v-480p"  # SimpleTuner's HunyuanVideo default (helpers/models/hunyuanvideo/model.py)
