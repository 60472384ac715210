"""Regenerate app/hvtune/config/simpletuner_options.json (every SimpleTuner option with its default) from an unpacked
SimpleTuner wheel: `pip download --no-deps simpletuner==4.10.1 --python-version 3.12 --only-binary=:all: -d /tmp/st`,
unzip it, then `python benchmarks/simpletuner_options.py /tmp/st/simpletuner`. Reads the field registry's source
(`simpletuner_sdk/server/services/field_registry/sections/*.py`, each `ConfigField(name=..., default_value=...)`), the
place SimpleTuner's argparse defaults come from (`helpers/configuration/cmd_args.py`); the optimizer names
(`helpers/training/optimizer_param.py`, the keys of `optimizer_choices`) and the keys a dataset entry of
multidatabackend.json may hold (every `backend.get("key")` / `backend_dict.get("key")` ... under
`helpers/data_backend/` and `helpers/metadata/`)."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "app" / "hvtune" / "config" / "simpletuner_options.json"


def read_fields(package: Path) -> dict[str, dict]:
    sections = package / "simpletuner_sdk" / "server" / "services" / "field_registry" / "sections"
    fields: dict[str, dict] = {}
    for path in sorted(sections.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ConfigField"):
                continue
            kw = {k.arg: k.value for k in node.keywords}
            if not isinstance(kw.get("name"), ast.Constant):
                continue  # names built in a loop (per-model variants), not options a config.json spells out
            name = kw["name"].value
            try:
                default = ast.literal_eval(kw["default_value"]) if "default_value" in kw else None
            except ValueError:
                default = "<expr:" + ast.unparse(kw["default_value"])[:40] + ">"
            fields[name] = {"default": default, "section": path.stem}
    return dict(sorted(fields.items()))


def read_optimizers(package: Path) -> list[str]:
    """Every name of `optimizer_choices` (its literal and each `optimizer_choices.update({...})`, whichever optional
    library guards it): the names SimpleTuner's config accepts."""
    tree = ast.parse((package / "helpers" / "training" / "optimizer_param.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        target = None
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "optimizer_choices":
            target = node.value
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "optimizer_choices.update" and node.args:
            target = node.args[0]
        if isinstance(target, ast.Dict):
            names |= {k.value for k in target.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    return sorted(names)


DATASET_KEY = re.compile(r"\b(?:backend|backend_dict|backend_config|hf_block|hf_config|parquet_config)"
                         r"(?:\.get\(|\[)\"([a-z_0-9]+)\"")  # fmt: skip


def read_dataset_keys(package: Path) -> list[str]:
    keys: set[str] = set()
    for folder in ("helpers/data_backend", "helpers/metadata"):
        for path in (package / folder).rglob("*.py"):
            keys |= set(DATASET_KEY.findall(path.read_text()))
    return sorted(k for k in keys if not k.startswith("_"))


def main(package: str) -> None:
    doc = {
        "simpletuner": "4.10.1",
        "source": "simpletuner/simpletuner_sdk/server/services/field_registry/sections/*.py"
        " (ConfigField name, default_value)",
        "options": read_fields(Path(package)),
        "optimizers": read_optimizers(Path(package)),
        "dataset_keys": read_dataset_keys(Path(package)),
    }
    OUT.write_text(json.dumps(doc, indent=0, default=str) + "\n")
    counts = ", ".join(f"{len(doc[part])} {part}" for part in ("options", "optimizers", "dataset_keys"))
    print(f"{counts} -> {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
