"""One flavour spec: every flavour's model sources, architecture and defaults come from its `FLAVOURS` entry, and the
offload settings are judged by one rule, the same for config and for the training device."""

from __future__ import annotations

import pytest

from hvtune.config.rules import check_device_support, offload_conflicts
from hvtune.config.schema import TrainConfig
from hvtune.flavours import FLAVOURS, TASKS, VISION
from hvtune.model.architectures import transformer_config
from hvtune.model.registry import plan_sources


@pytest.mark.parametrize("name", list(FLAVOURS))
def test_a_flavour_is_one_entry_that_every_stage_reads(name):
    spec = FLAVOURS[name]
    cfg = TrainConfig(model_flavour=name)
    assert list(plan_sources(cfg, env={})) == list(spec.components)
    assert plan_sources(cfg, env={})["transformer"].location == spec.diffusers_repo
    assert (set(VISION) <= set(spec.components)) == spec.image_condition == TASKS[spec.task].image_condition
    model = transformer_config(name)
    assert (model["target_size"], model["task_type"]) == (spec.target_size, spec.task)
    assert cfg.validation_size == spec.resolution and all(side % 16 == 0 for side in spec.resolution)


def test_offload_settings_that_cannot_work_together_or_on_this_device():
    both = TrainConfig(enable_group_offload=True, enable_model_cpu_offload=True)
    assert [key for key, _ in offload_conflicts(both)] == ["enable_model_cpu_offload"]
    stream = TrainConfig(enable_group_offload=True, group_offload_use_stream=True)
    assert offload_conflicts(stream) == [] and offload_conflicts(stream, "cuda") == []
    [(key, why)] = offload_conflicts(stream, "rocm")
    assert key == "group_offload_use_stream" and "CUDA" in why
    [problem] = check_device_support(stream, "cpu", "config.json")
    assert str(problem).startswith("config.json: group_offload_use_stream = True: needs an NVIDIA CUDA GPU")
