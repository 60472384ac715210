"""Regenerate app/hvtune/config/simpletuner_options.json (every SimpleTuner option with its default) from an unpacked
SimpleTuner wheel: `pip download --no-deps simpletuner==4.10.1 --python-version 3.12 --only-binary=:all: -d /tmp/st`,
unzip it, then `python benchmarks/simpletuner_options.py /tmp/st/simpletuner`. Reads the field registry's source
(`simpletuner_sdk/server/services/field_registry/sections/*.py`, each `ConfigField(name=..., default_value=...)`), the
place SimpleTuner's argparse defaults come from (`helpers/configuration/cmd_args.py`)."""

from __future__ import annotations

import ast
import json
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


def main(package: str) -> None:
    doc = {
        "simpletuner": "4.10.1",
        "source": "simpletuner/simpletuner_sdk/server/services/field_registry/sections/*.py (ConfigField)",
        "options": read_fields(Path(package)),
    }
    OUT.write_text(json.dumps(doc, indent=0, default=str) + "\n")
    print(f"{len(doc['options'])} options -> {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
