"""`hvtune compare RUN_A RUN_B`: did two runs train the same LoRA, and if not, what differed?

Verdicts (and exit codes):
  identical  (0)  every logged loss and every LoRA tensor is bitwise equal;
  equivalent (3)  losses and tensors agree within the tolerances below;
  different  (4)  anything beyond them.
Default tolerances are for the same inputs on other hardware (another GPU model or vendor, another process count):
per-step loss within `loss_rtol` of run A's loss, each LoRA tensor within `weight_rtol` relative L2 distance and with
cosine similarity at least `min_cosine`. docs/REPRODUCIBILITY.md explains where the numbers come from.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from hvtune.errors import UserError
from hvtune.output.record import plot_losses, read_loss_log
from hvtune.run_files import RECORD_NAME, RunFiles

EXIT_IDENTICAL, EXIT_EQUIVALENT, EXIT_DIFFERENT = 0, 3, 4
# inputs whose difference explains a difference in results; compared from the run records (RunFiles.record)
MANIFEST_FIELDS = {
    "config": ("config_hash",),
    "dataset manifest": ("dataset_manifest_hash",),
    "cache": ("cache_fingerprint",),
    "seed": ("seeds", "seed"),
    "world size": ("world_size",),
    "sharding": ("parallelism", "sharding"),
    "context-parallel degree": ("parallelism", "context_parallel_size"),
    "model revisions": ("model", "revisions"),
    "torch": ("environment", "packages", "torch"),
    "diffusers": ("environment", "packages", "diffusers"),
    "GPU": ("environment", "gpu", "name"),
    "CUDA": ("environment", "torch_cuda"),
    "HIP": ("environment", "torch_hip"),
    "deterministic": ("determinism", "deterministic"),
    "image": ("environment", "image"),
}


@dataclass
class Tolerances:
    loss_rtol: float = 0.02
    weight_rtol: float = 0.05
    min_cosine: float = 0.99


@dataclass
class Comparison:
    verdict: str
    loss_steps: int
    loss_max_abs: float
    loss_mean_abs: float
    loss_max_rel: float
    tensors: list[tuple[str, float, float, bool]]  # name, relative L2, cosine, bitwise equal
    missing_tensors: list[str]
    manifest: list[tuple[str, object, object]]  # name, A, B (only those that differ)
    notes: list[str] = field(default_factory=list)
    plot: Path | None = None  # the loss overlay, when it could be written

    @property
    def exit_code(self) -> int:
        return {"identical": EXIT_IDENTICAL, "equivalent": EXIT_EQUIVALENT}.get(self.verdict, EXIT_DIFFERENT)


def _run_dir(path: Path) -> Path:
    path = Path(path)
    if path.is_file() and path.name == RECORD_NAME:
        path = path.parent
    if not RunFiles(path).record.is_file():
        raise UserError(f"{path}: not a run directory (no {RECORD_NAME}); pass the output_dir of a finished run")
    return path


def _dig(data: dict, keys: tuple[str, ...]):
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _losses(run: Path) -> dict[int, float]:
    """{step: loss} of a run's loss log."""
    return {r["step"]: r["loss"] for r in read_loss_log(RunFiles(run).loss_log)}


def _tensor_differences(run_a: Path, run_b: Path) -> tuple[list[tuple[str, float, float, bool]], list[str]]:
    """(name, relative L2, cosine, bitwise equal) of every LoRA tensor both runs hold, and the names (or shape
    mismatches) of those only one holds."""
    import torch
    from safetensors.torch import load_file

    lora_a, lora_b = load_file(RunFiles(run_a).lora), load_file(RunFiles(run_b).lora)
    missing = sorted(set(lora_a) ^ set(lora_b))
    tensors = []
    for name in sorted(set(lora_a) & set(lora_b)):
        ta, tb = lora_a[name].double().flatten(), lora_b[name].double().flatten()
        if ta.shape != tb.shape:
            missing.append(f"{name} (shape {tuple(lora_a[name].shape)} vs {tuple(lora_b[name].shape)})")
            continue
        rel = (torch.linalg.norm(ta - tb) / torch.linalg.norm(ta).clamp_min(1e-12)).item()
        equal = torch.equal(lora_a[name], lora_b[name])
        # equal tensors point the same way, all-zero ones too (a LoRA B that never got a gradient)
        cos = 1.0 if equal else torch.nn.functional.cosine_similarity(ta, tb, dim=0, eps=1e-12).item()
        tensors.append((name, rel, cos, equal))
    return tensors, missing


def _with_parallelism(record: dict) -> dict:
    """A record from before `parallelism` was recorded: what its world size implied (one process, or DDP)."""
    if "parallelism" in record or "world_size" not in record:
        return record
    world = record["world_size"]
    implied = {"world_size": world, "sharding": "none" if world == 1 else "ddp", "context_parallel_size": 1}
    return {**record, "parallelism": implied}


def _manifest_differences(rec_a: dict, rec_b: dict) -> list[tuple[str, object, object]]:
    """The MANIFEST_FIELDS whose values differ between the two run records: (label, A, B)."""
    differ = []
    rec_a, rec_b = _with_parallelism(rec_a), _with_parallelism(rec_b)
    for label, keys in MANIFEST_FIELDS.items():
        va, vb = _dig(rec_a, keys), _dig(rec_b, keys)
        if va != vb:
            differ.append((label, va, vb))
    return differ


def compare_runs(run_a: Path, run_b: Path, tol: Tolerances | None = None, plot: Path | None = None) -> Comparison:
    tol = tol or Tolerances()
    a_dir, b_dir = _run_dir(run_a), _run_dir(run_b)
    rec_a, rec_b = (json.loads(RunFiles(d).record.read_text()) for d in (a_dir, b_dir))
    notes = []

    loss_a, loss_b = _losses(a_dir), _losses(b_dir)
    steps = sorted(set(loss_a) & set(loss_b))
    if set(loss_a) != set(loss_b):
        notes.append(
            f"loss logs cover different steps ({len(loss_a)} vs {len(loss_b)}); compared the {len(steps)} shared"
        )
    diffs = [abs(loss_a[s] - loss_b[s]) for s in steps]
    rels = [abs(loss_a[s] - loss_b[s]) / max(abs(loss_a[s]), 1e-12) for s in steps]
    losses_equal = bool(steps) and all(loss_a[s] == loss_b[s] for s in steps) and set(loss_a) == set(loss_b)

    tensors, missing = _tensor_differences(a_dir, b_dir)
    manifest = _manifest_differences(rec_a, rec_b)

    if losses_equal and not missing and all(equal for *_, equal in tensors):
        verdict = "identical"
    elif (
        steps
        and not missing
        and max(rels) <= tol.loss_rtol
        and all(rel <= tol.weight_rtol and cos >= tol.min_cosine for _, rel, cos, _ in tensors)
    ):
        verdict = "equivalent"
    else:
        verdict = "different"
    if plot is not None:
        try:  # the verdict never depends on being able to write the picture
            plot_losses(
                plot, {f"A {a_dir}": sorted(loss_a.items()), f"B {b_dir}": sorted(loss_b.items())}, f"loss: {verdict}"
            )
        except OSError as e:
            notes.append(f"warning: loss overlay not written to {plot} ({e.strerror or e}); pass --plot PATH")
            plot = None
    return Comparison(
        verdict,
        len(steps),
        max(diffs, default=math.nan),
        sum(diffs) / max(len(diffs), 1),
        max(rels, default=math.nan),
        tensors,
        missing,
        manifest,
        notes,
        plot,
    )


def format_comparison(c: Comparison, tol: Tolerances) -> str:
    worst = sorted(c.tensors, key=lambda t: -t[1])[:5]
    lines = [
        f"verdict: {c.verdict.upper()}",
        "",
        f"loss ({c.loss_steps} steps)   max |a-b| {c.loss_max_abs:.3g}   mean |a-b| {c.loss_mean_abs:.3g}   "
        f"max rel {c.loss_max_rel:.3g}   (tolerance {tol.loss_rtol:g})",
        f"LoRA ({len(c.tensors)} tensors)  bitwise equal {sum(t[3] for t in c.tensors)}   "
        f"max rel L2 {max((t[1] for t in c.tensors), default=math.nan):.3g} (tolerance {tol.weight_rtol:g})   "
        f"min cosine {min((t[2] for t in c.tensors), default=math.nan):.6f} (tolerance {tol.min_cosine:g})",
    ]
    if worst and not all(t[3] for t in c.tensors):
        lines.append("  largest differences:")
        lines += [f"    {name:<70} rel L2 {rel:.3g}  cos {cos:.6f}" for name, rel, cos, _ in worst]
    if c.missing_tensors:
        lines.append(f"  tensors in only one run: {', '.join(c.missing_tensors[:10])}")
    lines.append("")
    if c.manifest:
        lines.append("inputs that differ:")
        lines += [f"  {name:<18} A: {a!s:<40} B: {b!s}" for name, a, b in c.manifest]
    else:
        lines.append("inputs: the same config, data, cache, seed, world size, sharding, versions and hardware")
    lines += [f"note: {n}" for n in c.notes]
    return "\n".join(lines)
