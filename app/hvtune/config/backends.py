"""The datasets of a run: multidatabackend.json read with SimpleTuner's meaning (or one video dataset from
instance_data_dir), the top-level defaults each dataset takes, and the rules a dataset must follow. Each rule returns
(key, value, why) findings under the dataset's label, so the dataset loop reads as the list of what is checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hvtune.config.layering import read_json, resolve_path, validate_section
from hvtune.config.rules import FRAMES_RULE, frames_ok, resolution_problem, round16
from hvtune.config.schema import DatasetConfig, TrainConfig, parse_wxh
from hvtune.errors import ConfigError, Problem

Finding = tuple[str, Any, str]  # (key below the dataset's label, its value, why it is refused)


def default_backends(t: TrainConfig) -> list[DatasetConfig]:
    """No multidatabackend.json: one video dataset from instance_data_dir plus the text-embed cache. This dataset is
    hvtune's (SimpleTuner has no such path): its captions are the .txt files beside the clips unless the config's
    caption_strategy says otherwise."""
    strategy = t.caption_strategy if "caption_strategy" in t.model_fields_set else "textfile"
    return [
        DatasetConfig(
            id="videos", dataset_type="video", instance_data_dir=t.instance_data_dir, caption_strategy=strategy
        ),
        DatasetConfig(id="text-embeds", dataset_type="text_embeds", default=True),
    ]


def load_backends(path: Path, problems: list[Problem], notices: list[str], allow: bool) -> list[DatasetConfig]:
    data = read_json(path)
    if not isinstance(data, list):
        raise ConfigError([Problem(str(path), "(file)", type(data).__name__, "must be a JSON list of datasets")])
    datasets = []
    for i, entry in enumerate(data):
        label = f"[{i}]" + (f" id={entry.get('id')}" if isinstance(entry, dict) and entry.get("id") else "")
        if not isinstance(entry, dict):
            problems.append(Problem(str(path), label, entry, "each dataset must be a JSON object"))
            continue
        problems_local: list[Problem] = []
        ds = validate_section(DatasetConfig, entry, lambda _k: str(path), problems_local)
        for p in problems_local:
            problems.append(Problem(p.where, f"{label}.{p.key}", p.value, p.rule))
        if "id" not in entry:
            continue
        _round_resolution(ds, f"{label}.resolution", str(path), problems, notices)
        _report_dataset_keys(path, label, ds, allow, problems, notices)
        datasets.append(ds)
    return datasets


def _round_resolution(ds: DatasetConfig, key: str, where: str, problems: list[Problem], notices: list[str]) -> None:
    """A dataset's WxH or pixel resolution, each side rounded down to a multiple of 16; one out of range is left as
    it is for `resolution_problem` to refuse (not rounded down to 0)."""
    kind = ds.resolution_type or "pixel"
    if ds.resolution is None or resolution_problem(ds.resolution, kind) or kind == "area":
        return
    if isinstance(ds.resolution, str):
        try:
            w, h = parse_wxh(ds.resolution)
            ds.resolution = f"{round16(w, key, notices)}x{round16(h, key, notices)}"
        except ValueError as e:
            problems.append(Problem(where, key, ds.resolution, str(e)))
    elif isinstance(ds.resolution, int):
        ds.resolution = round16(ds.resolution, key, notices)


def _report_dataset_keys(path, label, ds: DatasetConfig, allow: bool, problems, notices) -> None:
    """Dataset and video keys hvtune has no field for: SimpleTuner's harmless ones are a notice; anything else would
    change what is trained (or is a typo of a key that does), so it is an error unless allow_unsupported_keys."""
    from hvtune.config.simpletuner import simpletuner_dataset_keys
    from hvtune.config.simpletuner_keys import DATASET_KEYS

    found = [(k, v, DATASET_KEYS.get(k)) for k, v in ds.unknown_keys.items()]
    found += [(f"video.{k}", v, None) for k, v in ds.video.unknown_keys.items()]
    ignored = []
    for key, value, policy in sorted(found, key=lambda t: t[0]):
        if policy is not None and policy.status == "ignored":
            ignored.append(f"{key} ({policy.note})")
            continue
        if policy is not None:
            reason = policy.note
        elif key in simpletuner_dataset_keys():
            reason = "a SimpleTuner dataset option hvtune does not implement"
        else:
            reason = "not a key hvtune or SimpleTuner 4.10.1 reads here (a typo?)"
        if allow:
            notices.append(f"{path} {label}: {key} NOT applied ({reason}; allow_unsupported_keys)")
        else:
            rule = f"{reason}. Remove it, or set allow_unsupported_keys: true to train without it"
            problems.append(Problem(str(path), f"{label}.{key}", value, rule))
    if ignored:
        notices.append(f"{path} {label}: ignored, no effect on the LoRA: " + "; ".join(ignored))


def dataset_defaults_from_config(datasets: list[DatasetConfig], t: TrainConfig) -> None:
    """SimpleTuner's data_backend/factory.py: a dataset without instance_prompt / prepend_instance_prompt takes the
    top-level one; only_instance_prompt applies when either sets it."""
    for ds in datasets:
        if "caption_strategy" not in ds.model_fields_set and "caption_strategy" in t.model_fields_set:
            ds.caption_strategy = t.caption_strategy
        if "instance_prompt" not in ds.model_fields_set and t.instance_prompt is not None:
            ds.instance_prompt = t.instance_prompt
        if "prepend_instance_prompt" not in ds.model_fields_set:
            ds.prepend_instance_prompt = t.prepend_instance_prompt
        ds.only_instance_prompt = ds.only_instance_prompt or t.only_instance_prompt


# ------------------------------------------------------------------------------------------------------------ rules


def check_dataset_rules(
    datasets: list[DatasetConfig], where: str, problems: list[Problem], check_paths: bool, config_path: Path | None
) -> None:
    """Unique ids, local media datasets with valid video, crop and caption settings and an existing folder (its
    resolved path replaces the setting), and exactly one default text-embed dataset."""
    seen: set[str] = set()
    defaults = []
    for i, ds in enumerate(datasets):
        label = f"[{i}] id={ds.id}"
        findings: list[Finding] = []
        if ds.id in seen:
            findings.append(("id", ds.id, "dataset ids must be unique"))
        seen.add(ds.id)
        if not ds.skipped:
            if ds.dataset_type == "text_embeds" and ds.default:
                defaults.append(ds.id)
            findings += _dataset_findings(ds, check_paths, config_path)
        problems.extend(Problem(where, f"{label}.{key}", value, rule) for key, value, rule in findings)
    if len(defaults) != 1:
        rule = 'exactly one enabled text_embeds dataset must have "default": true'
        problems.append(Problem(where, "text_embeds", defaults or None, rule))


def _dataset_findings(ds: DatasetConfig, check_paths: bool, config_path: Path | None) -> list[Finding]:
    """What is wrong with one enabled dataset, in the order it is listed."""
    findings: list[Finding] = []
    if ds.type != "local":
        findings.append(("type", ds.type, "only 'local' datasets are supported"))
    if ds.dataset_type == "text_embeds":
        return findings
    if ds.dataset_type not in ("video", "image"):
        return [*findings, ("dataset_type", ds.dataset_type, "must be video, image or text_embeds")]
    findings += _video_findings(ds) + _crop_findings(ds) + _caption_findings(ds)
    return findings + _data_dir_findings(ds, check_paths, config_path)


def _video_findings(ds: DatasetConfig) -> list[Finding]:
    v, found = ds.video, []
    if not frames_ok(v.num_frames):
        found.append(("video.num_frames", v.num_frames, FRAMES_RULE))
    if v.bucket_strategy not in ("aspect_ratio", "resolution_frames"):
        found.append(("video.bucket_strategy", v.bucket_strategy, "must be aspect_ratio or resolution_frames"))
    if v.frame_interval < 1:
        found.append(("video.frame_interval", v.frame_interval, "must be >= 1"))
    if v.max_frames is not None and v.max_frames < v.num_frames:
        found.append(("video.max_frames", v.max_frames, f"must be >= num_frames ({v.num_frames})"))
    return found


def _crop_findings(ds: DatasetConfig) -> list[Finding]:
    found = []
    if ds.crop and ds.crop_style not in ("center", "centre"):
        rule = "hvtune crops the centre (random, corner and face crops are not implemented): use center"
        found.append(("crop_style", ds.crop_style, rule))
    if ds.crop and ds.crop_aspect in ("random", "closest"):
        found.append(("crop_aspect", ds.crop_aspect, "not implemented: use square or preserve"))
    return found


def _caption_findings(ds: DatasetConfig) -> list[Finding]:
    found: list[Finding] = []
    if ds.caption_strategy == "instanceprompt" and not ds.instance_prompt:
        found.append(("instance_prompt", None, "caption_strategy instanceprompt needs it"))
    if ds.caption_strategy == "metadata" and not ds.metadata_file:
        found.append(("metadata_file", None, "caption_strategy metadata needs a jsonl or csv"))
    return found


def _data_dir_findings(ds: DatasetConfig, check_paths: bool, config_path: Path | None) -> list[Finding]:
    if not ds.instance_data_dir:
        return [("instance_data_dir", None, "a video or image dataset needs it")]
    if not check_paths:
        return []
    data_dir = resolve_path(ds.instance_data_dir, config_path)
    if not data_dir.is_dir():
        return [("instance_data_dir", ds.instance_data_dir, f"directory not found (looked for {data_dir.absolute()})")]
    ds.instance_data_dir = str(data_dir)
    return []


def check_dataset_simpletuner(
    datasets: list[DatasetConfig], t: TrainConfig, where: str, problems: list[Problem], notices: list[str]
) -> None:
    """Dataset settings whose SimpleTuner meaning needs the top-level config too."""
    media = [ds for ds in datasets if not ds.skipped and ds.dataset_type in ("video", "image")]
    if t.data_backend_sampling == "uniform" and len(media) > 1:
        rule = (
            "SimpleTuner's uniform draws each dataset equally often; hvtune trains every sample of every dataset "
            "each epoch (times its repeats): use auto-weighting, or one dataset"
        )
        problems.append(Problem(where, "data_backend_sampling", t.data_backend_sampling, rule))
    for i, ds in enumerate(datasets):
        if ds.skipped or ds.dataset_type not in ("video", "image"):
            continue
        label = f"[{i}] id={ds.id}"
        _frames_and_probability(ds, where, label, problems, notices)
        if ds.resolution is not None:  # the top-level one is checked with the training keys
            rule = resolution_problem(ds.resolution, ds.resolution_type or t.resolution_type)
            if rule:
                problems.append(Problem(where, f"{label}.resolution", ds.resolution, rule))
        maximum = ds.maximum_image_size if ds.maximum_image_size is not None else t.maximum_image_size
        downsample = ds.target_downsample_size if ds.target_downsample_size is not None else t.target_downsample_size
        if ds.crop and maximum and downsample:  # SimpleTuner: TrainingSample._should_resize_before_crop
            rule = (
                "with crop and maximum_image_size, SimpleTuner downsamples to it before cropping (a wider view); "
                "hvtune does not: drop maximum_image_size/target_downsample_size or crop"
            )
            problems.append(Problem(where, f"{label}.target_downsample_size", downsample, rule))
        if "caption_strategy" not in ds.model_fields_set and "caption_strategy" not in t.model_fields_set:
            notices.append(
                f"{where} {label}: caption_strategy not set: SimpleTuner's default, filename (captions from file "
                "names); set textfile to read the .txt beside each file"
            )


def _frames_and_probability(ds: DatasetConfig, where: str, label: str, problems: list[Problem], notices: list[str]):
    """SimpleTuner's factory requires video.min_frames >= num_frames (clips shorter than min_frames are skipped, every
    sample trains num_frames); hvtune also takes a smaller min_frames, training a shorter clip at its own 4n+1 length,
    and says so. A dataset's `probability` weighs how often SimpleTuner draws it; hvtune draws every sample of every
    dataset each epoch, which is SimpleTuner's default 1.0."""
    v = ds.video
    if ds.dataset_type == "video" and v.min_frames is not None and v.min_frames < v.num_frames:
        notices.append(
            f"{where} {label}: video.min_frames {v.min_frames} < num_frames {v.num_frames}: clips between them train "
            "at their own 4n+1 length (hvtune only: SimpleTuner 4.10.1 refuses min_frames < num_frames)"
        )
    if ds.probability != 1.0:
        rule = "dataset sampling probabilities are not implemented (hvtune uses every sample each epoch): use 1.0"
        problems.append(Problem(where, f"{label}.probability", ds.probability, rule))
