"""What SimpleTuner 4.10.1's own code computes for the two settings where hvtune once differed silently: the learning
rate of every step (lr_scheduler, lr_warmup_steps) and the LoRA target set for HunyuanVideo. Writes
tests/data/simpletuner_semantics.json, which tests/test_simpletuner_parity.py compares hvtune with; that test also
reruns this script against the wheel (skipped only when the wheel cannot be fetched).

    pip download --no-deps simpletuner==4.10.1 --python-version 3.12 --only-binary=:all: -d /tmp/st
    unzip -q /tmp/st/simpletuner-4.10.1-py3-none-any.whl -d /tmp/st/wheel
    PYTHONPATH=app python benchmarks/simpletuner_semantics.py /tmp/st/wheel [OUT.json]

- Schedules: SimpleTuner's `normalize_lr_scheduler_value` (helpers/configuration/cli_utils.py, applied with
  lr_warmup_steps as cmd_args.py does) and `get_lr_scheduler` (helpers/training/custom_schedule.py), imported from the
  unpacked wheel and stepped after each optimizer step as its trainer does. Each case lists the lr each step trains at.
- LoRA targets: `HunyuanVideo.DEFAULT_LORA_TARGET` / `DEFAULT_LORA_EXCLUDE_TARGETS` read from the wheel's source (the
  model module itself needs torchvision and the whole model zoo to import), `ModelFoundation.get_lora_target_layers`
  run from the wheel's source on a standard LoRA config, and the modules peft (what SimpleTuner's add_lora_adapter
  calls) adapts with them on the full-size HunyuanVideo 1.5 transformer, built on the meta device.
"""

from __future__ import annotations

import ast
import json
import logging
import sys
import types
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "simpletuner_semantics.json"
# (lr_scheduler as written, lr_warmup_steps, steps): what users write, including the two names SimpleTuner rewrites
SCHEDULE_CASES = [
    ("constant", 10, 14),
    ("constant", 0, 4),
    ("constant_with_warmup", 4, 8),
    ("cosine_with_warmup", 6, 14),
    ("cosine", 6, 14),
    ("linear", 3, 10),
    ("polynomial", 3, 10),
    ("sine", 5, 12),
]
LEARNING_RATE, LR_END, LR_POWER = 1e-4, 4e-7, 0.8


def schedules(wheel: Path) -> list[dict]:
    sys.path.insert(0, str(wheel))
    import torch
    from simpletuner.helpers.configuration.cli_utils import normalize_lr_scheduler_value
    from simpletuner.helpers.training.custom_schedule import get_lr_scheduler

    cases = []
    for written, warmup, steps in SCHEDULE_CASES:
        runs = normalize_lr_scheduler_value(written, warmup)
        args = types.SimpleNamespace(
            lr_scheduler=runs, lr_warmup_steps=warmup, max_train_steps=steps, lr_end=LR_END, lr_power=LR_POWER,
            lr_num_cycles=1,
        )  # fmt: skip
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LEARNING_RATE)
        accelerator = types.SimpleNamespace(num_processes=1)
        scheduler = get_lr_scheduler(args, optimizer, accelerator, logging.getLogger("st"), global_step=0)
        trained_at = []
        for _ in range(steps):
            trained_at.append(optimizer.param_groups[0]["lr"])  # the lr this step's optimizer.step() uses
            optimizer.step()
            scheduler.step()
        cases.append({"lr_scheduler": written, "lr_warmup_steps": warmup, "runs_as": runs, "lr": trained_at})
    return cases


def _class_constant(source: str, class_name: str, name: str):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.Assign) and getattr(item.targets[0], "id", None) == name:
                    return ast.literal_eval(item.value)
    raise LookupError(f"{class_name}.{name}")


def _methods(source: str, names: tuple[str, ...]) -> dict:
    """SimpleTuner's own methods, compiled from its source, to run on a stand-in model."""
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name in names and node.name not in found:
            namespace: dict = {}
            exec(compile(ast.Module([node], []), "simpletuner/helpers/models/common.py", "exec"), namespace)
            found[node.name] = namespace[node.name]
    return found


def lora_targets(wheel: Path) -> dict:
    models = wheel / "simpletuner" / "helpers" / "models"
    hunyuan = (models / "hunyuanvideo" / "model.py").read_text()
    common = (models / "common.py").read_text()
    default = _class_constant(hunyuan, "HunyuanVideo", "DEFAULT_LORA_TARGET")
    try:
        exclude = _class_constant(hunyuan, "HunyuanVideo", "DEFAULT_LORA_EXCLUDE_TARGETS")
    except LookupError:
        exclude = _class_constant(common, "ModelFoundation", "DEFAULT_LORA_EXCLUDE_TARGETS")
    methods = _methods(
        common, ("get_lora_target_layers", "_get_peft_lora_target_modules", "_get_additional_lora_targets")
    )
    model = types.SimpleNamespace(
        config=types.SimpleNamespace(lora_type="standard", peft_lora_target_modules=None, controlnet=False),
        DEFAULT_LORA_TARGET=default,
    )
    for name, function in methods.items():
        setattr(model, name, types.MethodType(function, model))
    targets = model.get_lora_target_layers()

    import torch
    from diffusers import HunyuanVideo15Transformer3DModel
    from peft import LoraConfig, inject_adapter_in_model

    from hvtune.model.architectures import transformer_config

    with torch.device("meta"):
        transformer = HunyuanVideo15Transformer3DModel(**transformer_config("t2v-480p"))
    inject_adapter_in_model(LoraConfig(r=4, target_modules=targets, exclude_modules=exclude), transformer)
    adapted = sorted(name for name, module in transformer.named_modules() if hasattr(module, "lora_A"))
    return {"default_lora_target": default, "exclude": exclude, "target_modules": targets, "full_model": adapted}


def main(wheel: str, out: str | None = None) -> None:
    doc = {
        "simpletuner": "4.10.1",
        "learning_rate": LEARNING_RATE,
        "lr_end": LR_END,
        "lr_power": LR_POWER,
        "schedules": schedules(Path(wheel)),
        "lora": lora_targets(Path(wheel)),
    }
    path = Path(out) if out else OUT
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{len(doc['schedules'])} schedules, {len(doc['lora']['full_model'])} LoRA modules -> {path}")


if __name__ == "__main__":
    main(*sys.argv[1:])
