"""`hvtune cache verify`: rehashes every entry of every root's index, and checks every entry the manifest needs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hvtune.cache.layout import CacheLayout
from hvtune.cache.manifest import parse_manifest
from hvtune.cache.store import RootIndex, entry_damage, entry_path
from hvtune.config.settings import ResolvedConfig
from hvtune.data.datasets import media_datasets


def verify_cache(resolved: ResolvedConfig) -> list[str]:
    """Rehash every entry of every index (and check every entry the manifest needs); one line per problem."""
    layout = CacheLayout(resolved)
    roots: set[Path] = {layout.text_root, layout.validation_root}
    roots |= {layout.vae_root(ds.id) for ds in media_datasets(resolved)}
    problems = _manifest_problems(layout, roots)
    for r in sorted(roots):
        problems += _index_problems(RootIndex(r))
    return problems


def _manifest_problems(layout: CacheLayout, roots: set[Path]) -> list[str]:
    """The entries the manifest needs that are missing or damaged; adds the manifest's roots to `roots`."""
    mpath = layout.manifest_path
    if not mpath.is_file():
        return [f"{mpath}: missing ({layout.rerun_hint})"]
    problems = []
    try:
        manifest = parse_manifest(layout, json.loads(mpath.read_text(encoding="utf-8")))
        roots |= set(manifest.vae_roots.values())
        for what, path in manifest.entry_files():
            damage = entry_damage(path)
            if damage:
                problems.append(f"{path}: {damage} ({what})")
    except (OSError, ValueError, KeyError, TypeError) as e:
        problems.append(f"{mpath}: unreadable ({e})")
    return problems


def _index_problems(index: RootIndex) -> list[str]:
    """Every entry of a root's index rehashed: missing, corrupt, or naming another key in its metadata."""
    from safetensors import safe_open

    r = index.root
    if not index.path.is_file():
        return [f"{index.path}: missing"] if r.is_dir() and any(r.iterdir()) else []
    problems = []
    for key, entry in sorted(index.entries.items()):
        path = entry_path(r, key)
        if not path.is_file():
            problems.append(f"{path}: missing ({entry.get('kind')} {entry.get('label', '')})")
            continue
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            problems.append(f"{path}: corrupt (sha256 differs from {index.path.name})")
            continue
        try:
            with safe_open(str(path), framework="pt") as f:
                if json.loads((f.metadata() or {}).get("hvtune", "{}")).get("key") != key:
                    problems.append(f"{path}: corrupt (its metadata names another key)")
        except Exception as e:  # safetensors raises its own error types
            problems.append(f"{path}: corrupt ({e})")
    return problems


def print_verify(resolved: ResolvedConfig) -> int:
    """`hvtune cache verify`: one line per problem, then the command that repairs them; exit 1 when any."""
    problems = verify_cache(resolved)
    for problem in problems:
        print(f"  {problem}")
    if not problems:
        print("cache verify: every entry intact")
        return 0
    print(f"cache verify: {len(problems)} problem(s); to repair: {CacheLayout(resolved).repair_hint}")
    return 1
