"""`hvtune compare` on crafted run folders (real safetensors LoRAs, loss logs and run.json): the verdict, its exit
code, and what it names as the difference. Fast: no training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hvtune.cli import main
from hvtune.errors import UserError
from hvtune.output.compare import EXIT_DIFFERENT, EXIT_EQUIVALENT, EXIT_IDENTICAL, Tolerances, compare_runs
from hvtune.run_files import RunFiles

LOSSES = [0.91, 0.74, 0.66, 0.52, 0.49]


def _lora(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "transformer.blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32, generator=g),
        "transformer.blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 4, generator=g),
    }


def _run(root: Path, *, lora: dict | None = None, losses: list[float] = LOSSES, **record) -> Path:
    """A finished run's folder as the trainer leaves it: run.json, logs/loss.jsonl, the LoRA."""
    files = RunFiles(root)
    files.logs.mkdir(parents=True)
    save_file(lora if lora is not None else _lora(), str(files.lora))
    rows = [{"step": i + 1, "loss": loss, "lr": 1e-3, "seconds": 0.1} for i, loss in enumerate(losses)]
    files.loss_log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = {"hvtune_run": 1, "global_step": len(losses), "seeds": {"seed": 42}, "world_size": 1, **record}
    files.record.write_text(json.dumps(doc))
    return root


def _cli(capsys, a: Path, b: Path, *extra: str) -> tuple[int, str]:
    plot = () if any(x.startswith("--plot") for x in extra) else ("--plot", str(a.parent / "compare_loss.png"))
    code = main(["compare", str(a), str(b), *plot, *extra])
    return code, capsys.readouterr().out


def test_the_same_run_twice_is_identical(tmp_path, capsys):
    a, b = _run(tmp_path / "a"), _run(tmp_path / "b")
    plot = tmp_path / "overlay.png"
    code, out = _cli(capsys, a, b, "--plot", str(plot))
    assert code == EXIT_IDENTICAL == 0
    assert out.startswith("verdict: IDENTICAL")
    assert "bitwise equal 2" in out
    assert "inputs: the same config, data, cache, seed" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"loss overlay: {plot}" in out


def test_small_differences_are_equivalent(tmp_path, capsys):
    nudged = {k: v * 1.001 for k, v in _lora().items()}
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b", lora=nudged, losses=[x * 1.005 for x in LOSSES], environment={"gpu": {"name": "H100"}})
    code, out = _cli(capsys, a, b, "--plot", str(tmp_path / "p.png"))
    assert code == EXIT_EQUIVALENT == 3
    assert out.startswith("verdict: EQUIVALENT")
    assert "bitwise equal 0" in out
    assert "inputs that differ:" in out and "GPU" in out and "H100" in out


def test_a_lora_b_that_never_trained_is_equal_not_orthogonal(tmp_path, capsys):
    """The default targets include modules that get no gradient: their lora_B stays all zeros in both runs."""
    zero = {"transformer.blocks.1.attn.to_add_out.lora_B.weight": torch.zeros(32, 4)}
    nudged = {k: v * 1.001 for k, v in _lora().items()}
    a = _run(tmp_path / "a", lora={**_lora(), **zero})
    b = _run(tmp_path / "b", lora={**nudged, **zero}, losses=[x * 1.005 for x in LOSSES])
    code, out = _cli(capsys, a, b)
    assert code == EXIT_EQUIVALENT, out


def test_other_weights_or_losses_are_different_and_the_differing_input_is_named(tmp_path, capsys):
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b", lora=_lora(seed=1), seeds={"seed": 7})
    code, out = _cli(capsys, a, b, "--plot", str(tmp_path / "p.png"))
    assert code == EXIT_DIFFERENT == 4
    assert out.startswith("verdict: DIFFERENT")
    assert "largest differences:" in out and "to_q.lora_A.weight" in out
    assert any(line.split()[:1] == ["seed"] and "42" in line and "7" in line for line in out.splitlines())


def test_tolerances_decide_between_equivalent_and_different(tmp_path):
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b", losses=[x * 1.05 for x in LOSSES])  # 5% off in loss, same weights
    assert compare_runs(a, b).verdict == "different"
    assert compare_runs(a, b, Tolerances(loss_rtol=0.06)).verdict == "equivalent"


def test_a_missing_tensor_or_missing_steps_are_reported(tmp_path):
    lora = _lora()
    lora.pop("transformer.blocks.0.attn.to_q.lora_B.weight")
    a, b = _run(tmp_path / "a"), _run(tmp_path / "b", lora=lora, losses=LOSSES[:3])
    result = compare_runs(a, b)
    assert result.verdict == "different"
    assert result.missing_tensors == ["transformer.blocks.0.attn.to_q.lora_B.weight"]
    assert result.loss_steps == 3
    assert result.notes == ["loss logs cover different steps (5 vs 3); compared the 3 shared"]


def test_run_json_itself_may_be_named_and_a_folder_without_one_is_refused(tmp_path, capsys):
    a, b = _run(tmp_path / "a"), _run(tmp_path / "b")
    assert compare_runs(RunFiles(a).record, b).verdict == "identical"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a run directory"):
        compare_runs(a, tmp_path / "empty")
    code = main(["compare", str(a), str(tmp_path / "empty"), "--plot", str(tmp_path / "p.png")])
    assert code == 2
    assert "not a run directory (no run.json)" in capsys.readouterr().err


def test_an_unwritable_plot_is_a_warning_not_a_failure(tmp_path):
    a, b = _run(tmp_path / "a"), _run(tmp_path / "b")
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = compare_runs(a, b, plot=blocker / "overlay.png")  # a file where a folder should be
    assert result.verdict == "identical" and result.plot is None
    assert result.notes and result.notes[0].startswith("warning: loss overlay not written")


def test_sharding_and_context_parallel_degree_are_inputs(tmp_path, capsys):
    """Issue 23: the same LoRA from a DDP and an FSDP2 run, or from a run recorded before `parallelism` existed (its
    world_size implies DDP): identical weights, and the sharding listed as an input that differs."""
    ddp = {"world_size": 2, "sharding": "ddp", "context_parallel_size": 1}
    fsdp = {"world_size": 2, "sharding": "fsdp2", "context_parallel_size": 2}
    old = _run(tmp_path / "old", world_size=2)  # no parallelism field: DDP on 2 processes
    a, b = _run(tmp_path / "a", world_size=2, parallelism=ddp), _run(tmp_path / "b", world_size=2, parallelism=fsdp)
    code, out = _cli(capsys, a, b)
    assert code == EXIT_IDENTICAL and "inputs that differ:" in out
    differ = out.split("inputs that differ:")[1]
    assert "sharding" in differ and "fsdp2" in differ and "context-parallel degree" in differ
    code, out = _cli(capsys, old, a)
    assert code == EXIT_IDENTICAL and "inputs: the same config, data, cache, seed, world size, sharding" in out
