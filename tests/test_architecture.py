"""The data flows one way (docs/ARCHITECTURE.md): the stage packages under app/hvtune/ come in pipeline order, and a
module imports only modules before it in STAGES, at the top or inside a function. The loop (`trainer`) and the entry
points come last because they wire the stages together."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "app" / "hvtune"

STAGES = [
    "files",  # atomic writes: used by every stage that writes
    "masking",  # secrets never shown: errors mask the values they print
    "errors",  # the error types every stage raises
    "rendezvous",  # several machines: do they reach machine rank 0 (before accelerate launch)
    "locks",  # one writer at a time: the cache's and the output folder's lock
    "progress_lines",  # the progress bar or log lines of every long phase (scan, cache, train)
    "run_files",  # the names of a run's files
    "flavours",  # what each flavour and task decides
    "config.simpletuner_keys",  # config: SimpleTuner's keys, the schema, layering, rules
    "config.simpletuner",
    "config.lycoris",
    "config.kernels",
    "config.schema",
    "config.layering",
    "config.rules",
    "config.backends",
    "config.settings",
    "model.component_files",  # model registry
    "model.architectures",
    "model.encoder_layouts",
    "model.registry",
    "model.attention",
    "data.media",  # datasets
    "data.issues",
    "data.buckets",
    "data.captions",
    "data.probe",
    "data.datasets",
    "cache.keys",  # cache
    "cache.store",
    "cache.layout",
    "cache.manifest",
    "cache.encoders",
    "cache.shard",
    "cache.report",
    "cache.plan",
    "cache.encode_missing",
    "cache.build",
    "cache.verify",
    "train.batches",  # batches and the training step
    "train.objective",
    "train.base_model",
    "train.compile",
    "train.lora",
    "train.optim",
    "train.sharding",
    "train.step",
    "train.stop",
    "train.ema",
    "train.context_parallel",
    "output.checkpoints",  # checkpoints / validation / export / run record / status
    "output.run_dir",
    "output.vae_decode",
    "output.validation",
    "output.comfyui",
    "output.export",
    "output.record",
    "output.compare",
    "output.progress",
    "output.status",
    "output.preflight",
    "trainer",  # the loop: wires the stages
    "plan.autocast",  # the full-size step on meta tensors (calls the training step)
    "plan.dataset",
    "plan.shapes",
    "plan.disk",
    "plan.tracker",
    "plan.simulate",
    "plan.validation",
    "plan.prediction",
    "plan.phases",
    "plan.scale",
    "plan.report",
    "serve.failures",  # the run page
    "serve.auth",
    "serve.loss_view",
    "serve.run_folder",  # reads what a run writes
    "serve.server",
    "testing.synth",  # the tiny stand-ins for tests and the demo
    "testing.tiny_model",
    "testing.tiny_encoders",
    "testing.demo",
    "library_logs",  # entry points
    "cli",
    "__main__",
]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def package_imports(path: Path) -> set[str]:
    """The hvtune modules `path` imports (dotted, below `hvtune`), anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{module_name(path)}: relative import; write `from hvtune.<stage>.<module> import`")
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hvtune."):
            module = node.module.removeprefix("hvtune.")
            if (PACKAGE / module.replace(".", "/")).is_dir():  # `from hvtune.train import ema`
                found |= {f"{module}.{a.name}" for a in node.names}
            else:
                found.add(module)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("hvtune.") for a in node.names if a.name.startswith("hvtune.")}
    return found


def test_every_module_has_a_place_in_the_flow():
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    modules = {m for m in modules if not m.endswith("__init__")}
    assert modules == set(STAGES), f"add new modules to STAGES (and docs/ARCHITECTURE.md): {modules ^ set(STAGES)}"


def test_each_stage_package_is_one_stretch_of_the_flow():
    """A folder is a stage: its modules sit together in STAGES, so the folder listing reads in pipeline order."""
    packages = [m.split(".")[0] for m in STAGES if "." in m]
    runs = [p for i, p in enumerate(packages) if i == 0 or packages[i - 1] != p]
    assert len(runs) == len(set(runs)), f"a stage package is split in STAGES: {runs}"


def test_package_inits_are_empty():
    """No re-exports and no work at import time: `hvtune check` imports only what it needs."""
    filled = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("__init__.py") if p.read_text().strip()]
    assert filled == [] or filled == ["__init__.py"], filled


def test_no_module_imports_a_later_stage():
    backwards = {
        f"{module} imports {other}"
        for module in STAGES
        for other in package_imports(PACKAGE / f"{module.replace('.', '/')}.py")
        if STAGES.index(other) >= STAGES.index(module)
    }
    assert not backwards, sorted(backwards)
