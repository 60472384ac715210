"""Every code snippet in README.md and docs/*.md is run by a test. Python snippets and the README's `hvtune` commands
run here, as written (a model id or a folder replaced by a tiny stand-in, named below); every other command block is
listed with the test that runs that exact command; output samples (blocks without a language) are listed as such. A
new snippet fails test_every_snippet_is_run_by_a_test until it is run here or listed."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)

# shell commands (first words) -> the test that runs them as the docs write them
FRESH_BOX = "tests/test_container_fresh_box.py::"
RUNTIME = "tests/test_container_runtime.py::"
COMMANDS = {
    "make demo": "tests/test_container_cuda.py::test_cuda_image_smoke_and_demo_matches_the_cpu_image",  # hvtune demo
    "make test": ".ci/run",  # CI runs exactly `make lint` and `make test`
    "cp .env.example .env": RUNTIME + "test_fresh_clone_compose_up_without_the_cpu_wheel_names_the_command",
    "make train": FRESH_BOX + "test_root_owned_outputs_stop_the_first_make_train_before_cache_without_a_pull",
    "mkdir -p outputs": FRESH_BOX + "test_puid0_refused_then_fixed_env_repairs_the_named_volume",
    "docker compose up": RUNTIME + "test_compose_up_as_documented_returns_the_failing_train_exit_code",
    "docker run": "tests/test_container.py::test_compose_up_train_twice_then_all_in_one_container",
    "hvtune check": "tests/test_doc_snippets.py::test_readme_hvtune_commands_run_as_written",
    "hvtune cache": "tests/test_doc_snippets.py::test_readme_hvtune_commands_run_as_written",
    "hvtune train": "tests/test_doc_snippets.py::test_readme_hvtune_commands_run_as_written",
    "hvtune serve": "tests/test_serve.py::test_serve_prints_the_address_with_its_token",
}
# stand-ins for what cannot exist here (the hub, a user's run folder), substituted before a python snippet runs
PYTHON_STAND_INS = {
    '"hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v"': "tiny_model",
    '"output/hunyuan-video"': "lora_dir",
}


def snippets() -> list[tuple[str, str, str]]:
    """(file:line, language, text) of every fenced block."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            where = f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}"
            found.append((where, m[1], m[2]))
    return found


def commands(block: str) -> list[str]:
    """The commands of a shell block: comments dropped, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [ln.split("  #")[0].split(" # ")[0].strip() for ln in joined.splitlines() if ln.strip()]


def test_every_snippet_is_run_by_a_test():
    unrun = []
    for where, lang, text in snippets():
        if lang in ("bash", "sh", "shell"):
            for cmd in commands(text):
                if not any(cmd == c or cmd.startswith(c + " ") for c in COMMANDS):
                    unrun.append(f"{where}: {cmd}")
        elif lang != "python" and lang:
            unrun.append(f"{where}: a {lang} block")
    assert not unrun, "snippets no test runs (run them here or list them in COMMANDS):\n" + "\n".join(unrun)
    for target in set(COMMANDS.values()):
        file, _, name = target.partition("::")
        assert (ROOT / file).exists() and (not name or f"\ndef {name}(" in (ROOT / file).read_text()), target


@pytest.fixture(scope="module")
def lora_dir(tiny_t2v, tmp_path_factory) -> Path:
    """A tiny LoRA as hvtune writes it (pytorch_lora_weights.safetensors), non-zero so that loading it shows."""
    from hvtune.config.settings import TrainConfig
    from hvtune.model.registry import load_transformer, resolve_model
    from hvtune.output.export import adapter_config, lora_state_dict, save_diffusers_lora
    from hvtune.train.lora import add_lora

    paths = resolve_model(TrainConfig(pretrained_model_name_or_path=str(tiny_t2v)), ["transformer"], env={})
    transformer = load_transformer(paths)
    add_lora(transformer, TrainConfig(lora_rank=4, lora_alpha=4.0))
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    out = tmp_path_factory.mktemp("lora")
    save_diffusers_lora(lora_state_dict(transformer), out, {}, adapter_config(transformer))
    return out


def assert_lora_loaded(pipe) -> None:
    lora_b = [p for n, p in pipe.transformer.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.all(p == 0.01) for p in lora_b), "the LoRA's weights are in the transformer"


def test_python_snippets_run_as_written(tiny_t2v, lora_dir):
    blocks = [(where, text) for where, lang, text in snippets() if lang == "python"]
    assert blocks, "the diffusers load snippet (docs/LORA_FORMATS.md)"
    values = {"tiny_model": tiny_t2v, "lora_dir": lora_dir}
    for where, text in blocks:
        code = text
        for literal, stand_in in PYTHON_STAND_INS.items():
            code = code.replace(literal, repr(str(values[stand_in])))
        namespace: dict = {}
        exec(compile(code, where, "exec"), namespace)  # the docs' own code, as a user pastes it
        assert_lora_loaded(namespace["pipe"])


def test_inline_load_lora_adapter_calls_run_as_written(tiny_t2v, lora_dir):
    """README's table names the call inline; it must work as printed (use_safetensors=True on diffusers 0.42.1)."""
    from diffusers import HunyuanVideo15Pipeline

    calls = {
        c for path in DOCS for c in re.findall(r"`(pipe\.transformer\.load_lora_adapter\([^`]*\))`", path.read_text())
    }
    assert calls, "README.md names the diffusers load call"
    for call in calls:
        pipe = HunyuanVideo15Pipeline.from_pretrained(tiny_t2v)
        exec(call, {"pipe": pipe, "output_dir": str(lora_dir)})
        assert_lora_loaded(pipe)


@pytest.mark.slow
def test_readme_hvtune_commands_run_as_written(tmp_path):
    """README's `hvtune check/cache/train --config config/config.json`, in a project laid out as the README says."""
    from hvtune.testing.demo import write_demo_project

    config = write_demo_project(tmp_path / "project", task="t2v", steps=2)
    project = config.parent.parent
    assert config == project / "config" / "config.json"
    readme = (ROOT / "README.md").read_text()
    block = next(text for _, lang, text in snippets() if lang == "bash" and "hvtune check --config" in text)
    assert block in readme
    for cmd in commands(block):
        argv = shlex.split(cmd)
        assert argv[0] == "hvtune"
        proc = subprocess.run([sys.executable, "-m", "hvtune", *argv[1:]], cwd=project, capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert list((project / "output").rglob("pytorch_lora_weights.safetensors"))
