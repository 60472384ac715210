"""EMA of the LoRA weights (`use_ema`), with SimpleTuner 4.10.1's meaning (simpletuner/helpers/training/ema.py and
trainer.py `init_ema_model`; defaults from its field registry, sections/training.py and logging_fields.py):

- The average is diffusers' `EMAModel` (SimpleTuner's class is a fork of it with the same update
  `shadow -= (1 - decay) * (shadow - param)`) over the trainable parameters: the LoRA weights.
- `ema_update_interval` (default 1): the EMA is updated after optimizer step `global_step` when
  `global_step % ema_update_interval == 0`.
- decay at an update: SimpleTuner passes `global_step` as the EMA's step, so the decay is diffusers' rule evaluated at
  that step: 0 at step 1 (the EMA starts as a copy of the weights), then `min((1 + s) / (10 + s), ema_decay)` with
  `s = global_step - 1`. `ema_decay` defaults to 0.995.
- `ema_validation` (default `comparison`): validate with the trained weights and the EMA weights; `ema_only`: only
  the EMA; `none`: only the trained weights.
- output: the EMA LoRA is exported beside the trained one, in `output_dir/ema/` (SimpleTuner writes `ema/` too),
  in both formats.

One deliberate difference: SimpleTuner casts its EMA copy to the training dtype (bf16 under bf16 mixed precision);
hvtune keeps it in float32 like the LoRA weights it averages. In bf16 an update of (1 - 0.995) x a small difference
is mostly lost to rounding, and float32 makes a resumed run's EMA identical byte for byte to an uninterrupted one.

Checkpoints carry the EMA as `ema.safetensors` (shadow weights by parameter name, the EMA step in the metadata), so a
resumed run continues the same average.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from hvtune.config.schema import TrainConfig
from hvtune.errors import UserError

CHECKPOINT_FILE = "ema.safetensors"


class LoraEMA:
    """The running average of `model`'s trainable parameters (call after the LoRA is injected)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig):
        from diffusers.training_utils import EMAModel

        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("use_ema: no trainable parameters; add the LoRA first")
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.interval = cfg.ema_update_interval or 1
        self._ema = EMAModel(self.params, decay=cfg.ema_decay, foreach=True)

    @property
    def step_count(self) -> int:
        return self._ema.optimization_step

    def update(self, global_step: int) -> bool:
        """After optimizer step `global_step`; True when the EMA was updated (see the module docstring)."""
        if global_step % self.interval != 0:
            return False
        self._ema.optimization_step = global_step - 1  # EMAModel.step adds 1, then takes the decay at that step
        self._ema.step(self.params)
        return True

    @property
    def decay(self) -> float:
        return self._ema.get_decay(self._ema.optimization_step)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model carries the EMA weights inside the block; the trained ones are put back exactly afterwards."""
        self._ema.store(self.params)
        self._ema.copy_to(self.params)
        try:
            yield
        finally:
            self._ema.restore(self.params)

    def checkpoint_files(self) -> dict[str, bytes]:
        """{file name: bytes} to store in a checkpoint directory."""
        from safetensors.torch import save

        tensors = {
            name: s.detach().cpu().contiguous() for name, s in zip(self.names, self._ema.shadow_params, strict=True)
        }
        return {CHECKPOINT_FILE: save(tensors, metadata={"ema_step": str(self._ema.optimization_step)})}

    def load_checkpoint(self, checkpoint: Path, log=print) -> None:
        """Restore the average saved in `checkpoint`. A checkpoint from a run without EMA starts the average from the
        resumed weights (said in one line): the weights are all there is to start it from."""
        from safetensors import safe_open

        path = Path(checkpoint) / CHECKPOINT_FILE
        if not path.is_file():
            log(f"use_ema: {checkpoint} has no EMA (saved with use_ema off); the EMA starts from the resumed weights")
            for shadow, param in zip(self._ema.shadow_params, self.params, strict=True):
                shadow.copy_(param.detach())
            return
        with safe_open(path, "pt") as f:
            names = set(f.keys())
            if names != set(self.names):
                raise UserError(
                    f"{path}: its EMA covers other LoRA weights than this run trains (lora_rank, lora_type or "
                    "lora_target_modules changed since the checkpoint); restore those settings or start a new run"
                )
            for name, shadow in zip(self.names, self._ema.shadow_params, strict=True):
                saved = f.get_tensor(name)
                if saved.shape != shadow.shape:
                    raise UserError(
                        f"{path}: {name} has shape {tuple(saved.shape)}, this run's is {tuple(shadow.shape)}"
                    )
                shadow.copy_(saved)
            self._ema.optimization_step = int((f.metadata() or {}).get("ema_step", 0))


def create(model: torch.nn.Module, cfg: TrainConfig) -> LoraEMA | None:
    return LoraEMA(model, cfg) if cfg.use_ema else None


def validation_variants(cfg: TrainConfig, ema: LoraEMA | None) -> list[tuple[str, contextlib.AbstractContextManager]]:
    """[(file name suffix, context that puts those weights in the model)] for one validation round, per
    `ema_validation`: the trained weights (suffix "") and/or the EMA weights (suffix "_ema")."""
    trained = ("", contextlib.nullcontext())
    if ema is None or cfg.ema_validation == "none":
        return [trained]
    if cfg.ema_validation == "ema_only":
        return [("_ema", ema.applied())]
    return [trained, ("_ema", ema.applied())]
