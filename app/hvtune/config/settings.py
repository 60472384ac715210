"""A run's resolved configuration: training keys and data backends with SimpleTuner's key names.

Values come in layers, later winning: built-in defaults, the config file, environment variables `HVTUNE_<KEY>`,
command-line flags `--key=value` (`hvtune.config.layering`). Every resolved value remembers where it came from
(`ResolvedConfig.sources`), so `hvtune check` can show it and the run record can store it. Keys we do not know
(SimpleTuner configs carry hundreds) are kept and reported once; they never change what runs.

Validation collects every problem before reporting: a user fixing a config wants the whole list, not one per run.
The fields are in `hvtune.config.schema`, the rules in `hvtune.config.rules` and `hvtune.config.backends`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvtune.config.backends import (
    check_dataset_rules,
    check_dataset_simpletuner,
    dataset_defaults_from_config,
    default_backends,
    load_backends,
)
from hvtune.config.layering import layer_values, resolve_path, validate_section
from hvtune.config.rules import check_added_features, check_train_rules
from hvtune.config.schema import DatasetConfig, TrainConfig
from hvtune.errors import ConfigError, Problem
from hvtune.flavours import Task
from hvtune.masking import mask_secrets


@dataclass
class ResolvedConfig:
    train: TrainConfig
    datasets: list[DatasetConfig]
    sources: dict[str, str]  # key -> "default" | "file:PATH" | "env:VAR" | "flag:--key"
    config_path: Path | None
    backend_path: Path | None
    notices: list[str] = field(default_factory=list)
    unknown: dict[str, Any] = field(default_factory=dict)  # unknown training keys, kept for the run record

    @property
    def task(self) -> Task:
        return self.train.flavour.task

    def to_record(self) -> dict[str, Any]:
        return {
            "config": mask_secrets(self.train.model_dump(mode="json", by_alias=False)),
            "datasets": [mask_secrets(d.model_dump(mode="json")) for d in self.datasets],
            "sources": self.sources,
            "unknown_keys": mask_secrets(self.unknown),
            "config_path": str(self.config_path) if self.config_path else None,
            "backend_path": str(self.backend_path) if self.backend_path else None,
        }


def load_config(
    config_path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    argv: Sequence[str] = (),
    check_paths: bool = True,
) -> ResolvedConfig:
    path = Path(config_path) if config_path else None
    problems: list[Problem] = []
    layers = layer_values(path, os.environ if env is None else env, argv)
    sources, notices = layers.sources, layers.notices

    train = validate_section(TrainConfig, layers.raw, layers.place("defaults"), problems)
    for name in TrainConfig.model_fields:
        sources.setdefault(name, "default")
    unknown = {k: v for k, v in layers.raw.items() if k not in TrainConfig.model_fields}
    _report_unknown_keys(unknown, train.allow_unsupported_keys, layers.place("config"), problems, notices)
    _resolve_seed(train, sources, notices)

    check_train_rules(train, layers.place("defaults"), problems, notices)
    if train.validation_resolution is None:
        train.validation_resolution = "{}x{}".format(*train.flavour.resolution)
        sources["validation_resolution"] = f"default for {train.model_flavour}"

    backend_path, datasets = _load_datasets(train, path, check_paths, problems, notices)
    check_added_features(train, datasets, layers.place("defaults"), problems, path)

    if problems:
        raise ConfigError(problems)
    return ResolvedConfig(train, datasets, sources, path, backend_path, notices, unknown)


def _load_datasets(
    train: TrainConfig, path: Path | None, check_paths: bool, problems: list[Problem], notices: list[str]
) -> tuple[Path | None, list[DatasetConfig]]:
    """The multidatabackend.json's datasets (or the one from instance_data_dir), with the top-level defaults they
    take, checked."""
    backend_path = None
    datasets: list[DatasetConfig] = []
    if train.data_backend_config:
        backend_path = resolve_path(train.data_backend_config, path)
        try:
            datasets = load_backends(backend_path, problems, notices, train.allow_unsupported_keys)
        except ConfigError as e:
            problems.extend(e.problems)
    elif train.instance_data_dir:
        datasets = default_backends(train)
    else:
        rule = "set data_backend_config (a multidatabackend.json) or instance_data_dir"
        problems.append(Problem("config", "data_backend_config", None, rule))
    if datasets:
        where = str(backend_path or "instance_data_dir")
        dataset_defaults_from_config(datasets, train)
        check_dataset_rules(datasets, where, problems, check_paths, path)
        check_dataset_simpletuner(datasets, train, where, problems, notices)
    return backend_path, datasets


def _report_unknown_keys(unknown: dict[str, Any], allow: bool, where, problems: list[Problem], notices: list[str]):
    """Keys hvtune has no field for, grouped as simpletuner.classify_unknown says: refused ones are errors (they
    change training in SimpleTuner) unless allow_unsupported_keys; the others are one notice per group."""
    from hvtune.config.simpletuner import classify_unknown

    groups: dict[str, list[str]] = {"ignored": [], "unknown": [], "allowed": []}
    for key in sorted(unknown):
        group, reason = classify_unknown(key, unknown[key])
        if group == "refused" and not allow:
            rule = (
                f"changes training in SimpleTuner and hvtune does not do it: {reason}. "
                "Remove it, or set allow_unsupported_keys: true to train without it"
            )
            problems.append(Problem(where(key), key, unknown[key], rule))
        else:
            groups["allowed" if group == "refused" else group].append(f"{key} ({reason})")
    labels = {
        "ignored": "ignored, no effect on the LoRA",
        "unknown": "unknown, ignored",
        "allowed": "NOT applied although they change training in SimpleTuner (allow_unsupported_keys)",
    }
    for group, entries in groups.items():
        if entries:
            notices.append(f"{labels[group]} ({len(entries)}): " + "; ".join(entries))


def _resolve_seed(t: TrainConfig, sources: dict[str, str], notices: list[str]) -> None:
    """SimpleTuner (helpers/configuration/cmd_args.py): seed 0 = the current time, -1 = a random seed."""
    if t.seed not in (0, -1):
        return
    import random
    import time

    asked = t.seed
    t.seed = int(time.time()) if asked == 0 else random.randint(0, 2**30)
    sources["seed"] += f" ({asked} -> drawn)"
    notices.append(f"seed {asked}: drew seed {t.seed} (recorded in run.json; pass --seed={t.seed} to repeat)")
