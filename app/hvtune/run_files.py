"""Where a run's files live inside its output folder: the one home of every name hvtune writes there.

The trainer, checkpoints, validation, export, the record, `compare`, `serve` and the CLI's summary all ask a
`RunFiles` instead of spelling a file name, so a renamed file is one edit and the page can never look in the wrong
place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LORA_NAME = "pytorch_lora_weights.safetensors"  # diffusers' `load_lora_weights` default weight name
COMFYUI_NAME = "comfyui_lora.safetensors"
RECORD_NAME = "run.json"
STATUS_NAME = "status.json"
LOSS_PLOT_NAME = "loss.png"
EMA_NAME = "ema"  # use_ema: the EMA weights' LoRA files, same names, in this subfolder


@dataclass(frozen=True)
class RunFiles:
    """The files of one run, under its `output_dir`."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def lora(self) -> Path:
        return self.root / LORA_NAME

    @property
    def comfyui(self) -> Path:
        return self.root / COMFYUI_NAME

    @property
    def record(self) -> Path:
        return self.root / RECORD_NAME

    @property
    def train_lock(self) -> Path:
        """Held while `hvtune train` writes here (`hvtune.locks`): names the process that holds it."""
        return self.root / ".train.lock"

    @property
    def status(self) -> Path:
        return self.root / STATUS_NAME

    @property
    def loss_plot(self) -> Path:
        return self.root / LOSS_PLOT_NAME

    @property
    def ema(self) -> RunFiles:
        """The EMA weights' LoRA files (`use_ema`): the same names in the `ema/` subfolder."""
        return RunFiles(self.root / EMA_NAME)

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def loss_log(self) -> Path:
        return self.logs / "loss.jsonl"

    @property
    def library_log(self) -> Path:
        return self.logs / "libraries.log"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def validation_root(self) -> Path:
        return self.root / "validation"

    def validation(self, step: int) -> Path:
        """The folder of the validation videos rendered after optimiser step `step`."""
        return self.validation_root / f"step_{step:06d}"

    def owned(self) -> tuple[Path, ...]:
        """Everything hvtune itself writes here: what `overwrite_output_dir` removes, and nothing else."""
        return (
            self.checkpoints,
            self.logs,
            self.validation_root,
            self.record,
            self.loss_plot,
            self.lora,
            self.comfyui,
        )


def files_for_each_tool(files: RunFiles) -> list[tuple[str, Path]]:
    """Which of a run's files each tool loads: the end of `train` and the run page's download list both say it from
    here. ComfyUI applies nothing from the diffusers file (it has no entry for diffusers' names), so it matters."""
    return [
        ("ComfyUI", files.comfyui),
        ("diffusers / peft (load_lora_adapter)", files.lora),
    ]


def which_file_line(files: RunFiles) -> str:
    """For the end of `train`: the file for each tool, and what a checkpoint's LoRA is for."""
    tools = "; ".join(f"{tool}: {path.name}" for tool, path in files_for_each_tool(files))
    return f"{tools} (a checkpoint's lora.safetensors is for resuming: ComfyUI applies nothing from it)"
