"""Model registry: where every component of a flavour comes from, and how it is fetched and loaded. Which
components a flavour needs and which hub repo holds them in diffusers layout is its `hvtune.flavours` entry.

Resolution order for the encoders (the seed's guide documents these variables; we honour them):
  1. `HUNYUANVIDEO_TEXT_ENCODER_PATH` / `HUNYUANVIDEO_VISION_ENCODER_PATH` (mounted local copies),
  2. config keys `text_encoder_path` / `vision_encoder_path`,
  3. the model itself (`pretrained_model_name_or_path`).
A local root is checked for completeness before anything heavy is loaded; a hub id is fetched through
huggingface_hub (resumable, `allow_patterns` limited to what the flavour needs, `HF_HUB_OFFLINE=1` honoured) and
the commit it resolved to is recorded. Loaders only ever read local directories.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hvtune.config.schema import TrainConfig
from hvtune.errors import UserError
from hvtune.flavours import CORE, MODEL_REPO, TEXT, VISION
from hvtune.model.component_files import missing_files
from hvtune.model.encoder_layouts import (
    DIFFUSERS,
    TENCENT,
    load_tencent_text_encoders,
    missing_text_files,
    text_component_dirs,
    text_layout,
    text_layout_hint,
    vision_root,
)


class ModelSourceError(UserError):
    """A model component cannot be found, fetched or trusted; the message says what to do."""


@dataclass(frozen=True)
class Source:
    """Where a group of components comes from: a hub repo or a local root, each component in a subfolder."""

    location: str  # hub repo id or local directory
    origin: str  # "config", "env:VAR", "config:key", "model"
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.location).expanduser().is_dir() or self.location.startswith(("/", "./", "../", "~"))


@dataclass
class ModelPaths:
    """Every component resolved to a local directory, plus the commit each hub source resolved to."""

    components: dict[str, Path]
    revisions: dict[str, str | None] = field(default_factory=dict)  # location -> commit hash (None: local)
    origins: dict[str, str] = field(default_factory=dict)  # component -> origin of its source

    def __getitem__(self, name: str) -> Path:
        return self.components[name]

    def record(self) -> dict:
        return {
            "components": {k: str(v) for k, v in self.components.items()},
            "revisions": self.revisions,
            "origins": self.origins,
        }


def plan_sources(cfg: TrainConfig, env: Mapping[str, str] | None = None) -> dict[str, Source]:
    """Which source each component comes from, without touching disk or network."""
    env = os.environ if env is None else env
    model = cfg.pretrained_model_name_or_path
    if model == MODEL_REPO:  # Tencent's original format: the same weights in diffusers layout, one repo per flavour
        model = cfg.flavour.diffusers_repo
    base = Source(model, "config:pretrained_model_name_or_path", cfg.revision)

    def encoder_source(var: str, key: str, value: str | None) -> Source:
        if env.get(var):
            return Source(env[var], f"env:{var}")
        if value:
            return Source(value, f"config:{key}")
        return base

    text = encoder_source("HUNYUANVIDEO_TEXT_ENCODER_PATH", "text_encoder_path", cfg.text_encoder_path)
    vision = encoder_source("HUNYUANVIDEO_VISION_ENCODER_PATH", "vision_encoder_path", cfg.vision_encoder_path)
    group_source = {**dict.fromkeys(CORE, base), **dict.fromkeys(TEXT, text), **dict.fromkeys(VISION, vision)}
    return {name: group_source[name] for name in cfg.flavour.components}  # the flavour's task says which


def _check_local(source: Source, components: list[str]) -> dict[str, Path]:
    """Each component's folder under a local root, once the root is complete. A text-encoder-only root may be in
    Tencent's layout (llm/, byt5-small/, Glyph-SDXL-v2/, or Tencent's ckpts/ above them); a vision-only root may be
    Tencent's ckpts/ or vision_encoder/ above siglip/."""
    root = Path(source.location).expanduser()
    if not root.is_dir():
        raise ModelSourceError(f"{source.origin}: {root} is not a directory")
    text_only = set(components) <= set(TEXT)
    if text_only and text_layout(root) == TENCENT:
        missing, hint = missing_text_files(root, TENCENT), text_layout_hint(root, TENCENT)
        dirs = text_component_dirs(root, TENCENT)
    else:
        if set(components) <= set(VISION):
            root = vision_root(root)
        missing = missing_files(root, components)
        hint = (
            text_layout_hint(root, DIFFUSERS)
            if text_only
            else "expected the diffusers layout: one subfolder per component"
        )
        dirs = {name: root / name for name in components}
    if missing:
        raise ModelSourceError(f"{source.origin}: {root} is incomplete; missing {', '.join(missing)} ({hint})")
    return {name: dirs[name] for name in components}


def local_source_problems(cfg: TrainConfig, env: Mapping[str, str] | None = None) -> list[str]:
    """What `fetch`, `cache` and `train` would refuse later about the local model folders (missing, empty,
    incomplete), found now without loading or downloading anything; hub sources are left to `fetch`."""
    groups: dict[Source, list[str]] = {}
    for name, source in plan_sources(cfg, env).items():
        groups.setdefault(source, []).append(name)
    problems = []
    for source, names in groups.items():
        if source.is_local:
            try:
                _check_local(source, names)
            except ModelSourceError as e:
                problems.append(str(e))
    return problems


def _fetch(source: Source, components: list[str], *, allow_download: bool) -> tuple[Path, str]:
    """Snapshot of the needed subfolders from the hub (or the local HF cache when offline)."""
    # huggingface_hub 2.x talks to the hub through httpx2 (pinned with it in the lock): its connection errors
    from httpx2 import TransportError
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = ["model_index.json", *[f"{c}/*" for c in components]]
    offline = not allow_download or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:
        if not offline:
            _check_free_space(source, patterns)
        path = Path(
            snapshot_download(
                source.location, revision=source.revision, allow_patterns=patterns, local_files_only=offline
            )
        )
    except GatedRepoError as e:
        raise ModelSourceError(
            f"{source.location} is gated: accept its licence on huggingface.co and set HF_TOKEN ({source.origin})"
        ) from e
    except RepositoryNotFoundError as e:
        hint = "" if os.environ.get("HF_TOKEN") else " (HF_TOKEN is not set: private repos need it)"
        raise ModelSourceError(f"{source.location}: repository not found on the hub{hint} ({source.origin})") from e
    except RevisionNotFoundError as e:
        raise ModelSourceError(f"{source.location}: revision {source.revision!r} not found ({source.origin})") from e
    except TransportError as e:  # model_info before the download: no route, DNS, refused, timeout, proxy
        raise _unreachable(source, e) from e
    except LocalEntryNotFoundError as e:
        if not offline:  # snapshot_download found no connection and nothing cached
            raise _unreachable(source, e.__cause__ or e) from e
        raise ModelSourceError(
            f"{source.location} is not in the local Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')})"
            " and downloads are off (HF_HUB_OFFLINE=1): run `hvtune fetch` online first, or mount a local copy"
        ) from e
    missing = missing_files(path, components)
    if missing:
        raise ModelSourceError(f"{source.location}@{path.name}: the repo lacks {', '.join(missing)}")
    return path, path.name  # snapshot folders are named by commit hash


def _unreachable(source: Source, error: BaseException) -> ModelSourceError:
    """No route to the hub: one line naming the three ways out, not httpx's traceback."""
    from huggingface_hub import constants

    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return ModelSourceError(
        f"cannot reach the Hugging Face hub at {constants.ENDPOINT} to fetch {source.location} ({source.origin}): "
        f"{type(error).__name__}: {reason}. Either mount the models (a local pretrained_model_name_or_path, "
        "HUNYUANVIDEO_TEXT_ENCODER_PATH / HUNYUANVIDEO_VISION_ENCODER_PATH), or set HF_HUB_OFFLINE=1 to use what is "
        "already in HF_HOME, or set HTTPS_PROXY if this network reaches the internet through a proxy"
    )


def _check_free_space(source: Source, patterns: list[str]) -> None:
    from fnmatch import fnmatch

    from huggingface_hub import HfApi, constants

    info = HfApi().model_info(source.location, revision=source.revision, files_metadata=True)
    need = sum(s.size or 0 for s in info.siblings or [] if any(fnmatch(s.rfilename, p) for p in patterns))
    cache = Path(constants.HF_HUB_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if need > free:
        raise ModelSourceError(
            f"{source.location} needs {need / 1e9:.1f} GB but {cache} has {free / 1e9:.1f} GB free: "
            "free space or point HF_HOME at a bigger volume"
        )


def resolve_model(
    cfg: TrainConfig,
    components: tuple[str, ...] | list[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    allow_download: bool = True,
) -> ModelPaths:
    """Resolve `components` (default: all the flavour needs) to local directories, local roots checked first."""
    plan = plan_sources(cfg, env)
    wanted = list(components) if components is not None else list(plan)
    groups: dict[Source, list[str]] = {}
    for name in wanted:
        groups.setdefault(plan[name], []).append(name)
    # Check every local root before fetching anything: a bad mount should fail in a second, not after a download.
    roots = {s: _check_local(s, names) for s, names in groups.items() if s.is_local}
    paths = ModelPaths({})
    for source, names in groups.items():
        if source in roots:
            dirs, revision = roots[source], None
        else:
            root, revision = _fetch(source, names, allow_download=allow_download)
            dirs = {name: root / name for name in names}
        paths.revisions[source.location] = revision
        for name in names:
            paths.components[name] = dirs[name]
            paths.origins[name] = source.origin
    return paths


def detect_device() -> str:
    """'cuda' (NVIDIA), 'rocm' (AMD through HIP) or 'cpu'."""
    import torch

    if torch.cuda.is_available():
        return "rocm" if torch.version.hip else "cuda"
    return "cpu"


# ------------------------------------------------------------------------------------------------------------ loaders


def load_transformer(paths: ModelPaths, dtype=None):
    from diffusers import HunyuanVideo15Transformer3DModel

    return HunyuanVideo15Transformer3DModel.from_pretrained(paths["transformer"], torch_dtype=dtype)


def load_vae(paths: ModelPaths, dtype=None):
    from diffusers import AutoencoderKLHunyuanVideo15

    return AutoencoderKLHunyuanVideo15.from_pretrained(paths["vae"], torch_dtype=dtype).eval()


# SimpleTuner's vae_dtype values -> torch dtype names ("default": the training dtype, see vae_dtype_name)
VAE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def vae_dtype_name(cfg: TrainConfig, on_gpu: bool) -> str:
    """The VAE's dtype for the cache's encode and the validation decode: SimpleTuner's `vae_dtype` (bf16 by default,
    fp16, fp32; `default` is the training dtype: bf16 with mixed_precision bf16, else fp32). On the CPU always
    float32: bf16 convolutions there run several times slower than float32 (docs/PERFORMANCE.md, "The validation
    decode"), and a CPU has the memory a GPU lacks."""
    if not on_gpu:
        return "float32"
    if cfg.vae_dtype == "default":
        return "bfloat16" if cfg.mixed_precision == "bf16" else "float32"
    return VAE_DTYPES[cfg.vae_dtype]


def load_vae_decoder(paths: ModelPaths, dtype=None):
    """The VAE without its encoder half: validation only decodes, so the encoder (1.45 GiB in float32 at full size)
    never reaches the GPU."""
    vae = load_vae(paths, dtype=dtype)
    vae.encoder = None
    return vae


def load_scheduler(paths: ModelPaths):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(paths["scheduler"])


def load_text_encoders(paths: ModelPaths, dtype=None) -> dict:
    from transformers import AutoTokenizer, ByT5Tokenizer, Qwen2_5_VLTextModel, T5EncoderModel

    root = paths["text_encoder"].parent
    if text_layout(root) == TENCENT:
        return load_tencent_text_encoders(root, dtype)
    return {
        "tokenizer": AutoTokenizer.from_pretrained(paths["tokenizer"]),
        "text_encoder": Qwen2_5_VLTextModel.from_pretrained(paths["text_encoder"], dtype=dtype).eval(),
        "tokenizer_2": ByT5Tokenizer.from_pretrained(paths["tokenizer_2"]),
        "text_encoder_2": T5EncoderModel.from_pretrained(paths["text_encoder_2"], dtype=dtype).eval(),
    }


def load_vision_encoder(paths: ModelPaths, dtype=None) -> dict:
    from transformers import SiglipImageProcessor, SiglipVisionModel

    return {
        "image_encoder": SiglipVisionModel.from_pretrained(paths["image_encoder"], dtype=dtype).eval(),
        "feature_extractor": SiglipImageProcessor.from_pretrained(paths["feature_extractor"]),
    }
