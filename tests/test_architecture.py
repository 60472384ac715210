"""The data flows one way (docs/ARCHITECTURE.md): a module imports only modules before it in STAGES, at the top or
inside a function. The loop and the entry points come last because they wire the stages together."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "app" / "hvtune"

STAGES = [
    "files",  # used by every stage that writes
    "simpletuner",  # what each SimpleTuner key means (data only)
    "lycoris",  # the lycoris_config file, read by config
    "config",
    "model_files",  # model registry
    "architectures",
    "tiny_model",
    "encoder_layouts",
    "registry",
    "media",  # datasets
    "synth",
    "datasets",
    "cache_store",  # cache
    "manifest",
    "encoders",
    "cache",
    "batches",  # batches
    "objective",  # training step
    "attention",
    "memory",
    "ema",
    "checkpoints",  # checkpoints / validation / export
    "validation",
    "export",
    "record",  # run record
    "compare",
    "progress",  # progress lines / bar
    "status",  # status.json, written by the loop
    "trainer",  # the loop: wires the stages
    "plan",  # the full-size step on meta tensors (uses the trainer's step)
    "serve",  # the run page: reads what the run writes
    "demo",  # entry points
    "library_logs",
    "cli",
    "__main__",
]


def package_imports(path: Path) -> set[str]:
    """The hvtune modules `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("hvtune."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("hvtune.")}
    return found


def test_every_module_has_a_place_in_the_flow():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(STAGES), f"add new modules to STAGES (and docs/ARCHITECTURE.md): {modules ^ set(STAGES)}"


def test_no_module_imports_a_later_stage():
    backwards = {
        f"{module} imports {other}"
        for module in STAGES
        for other in package_imports(PACKAGE / f"{module}.py")
        if STAGES.index(other) >= STAGES.index(module)
    }
    assert not backwards, sorted(backwards)
