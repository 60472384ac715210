"""`hvtune` command line: parses arguments and wires the stages together; no logic of its own."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import ConfigError, ResolvedConfig, check_device_support, load_config

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2


def _config(args: argparse.Namespace) -> ResolvedConfig:
    resolved = load_config(args.config, argv=args.overrides)
    for notice in resolved.notices:
        print(f"notice: {notice}", file=sys.stderr)
    return resolved


def cmd_check(args: argparse.Namespace) -> int:
    from .registry import detect_device

    resolved = _config(args)
    problems = check_device_support(resolved.train, detect_device(), str(resolved.config_path or "config"))
    if problems:
        raise ConfigError(problems)
    values = resolved.train.model_dump(mode="json")
    width = max(map(len, values))
    print(f"config: {resolved.config_path or '(none: defaults, environment and flags)'}")
    for key, value in values.items():
        print(f"  {key:<{width}}  {value!r:<40}  {resolved.sources.get(key, 'default')}")
    print(f"datasets: {resolved.backend_path or '(from instance_data_dir)'}")
    for ds in resolved.datasets:
        state = "disabled" if ds.disabled else ds.dataset_type
        print(f"  {ds.id}: {state} {ds.instance_data_dir or ds.cache_dir or ''}")
    print("config OK")
    return EXIT_OK


def cmd_fetch(args: argparse.Namespace) -> int:
    from .registry import resolve_model

    resolved = _config(args)
    paths = resolve_model(resolved.train)
    for name, path in paths.components.items():
        print(f"  {name:<18} {path}  ({paths.origins[name]})")
    print("all components present")
    return EXIT_OK


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from .tiny_model import write_tiny_model

    out = write_tiny_model(args.out, task=args.task, seed=args.seed)
    print(f"tiny {args.task} model written to {out}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hvtune", description="LoRA training appliance for HunyuanVideo 1.5")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_ + " Extra --key=value flags override config keys.")
        p.add_argument("--config", type=Path, help="SimpleTuner-style config.json (optional)")
        p.set_defaults(func=func, takes_overrides=True)
        return p

    with_config("check", cmd_check, "Validate the config and show every resolved value with its source.")
    with_config("fetch", cmd_fetch, "Resolve or download every model component the flavour needs.")

    p = sub.add_parser("tiny-model", help="Write a tiny random HunyuanVideo 1.5 pipeline (tests, demo).")
    p.add_argument("out", type=Path)
    p.add_argument("--task", choices=["t2v", "i2v"], default="t2v")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .registry import ModelSourceError

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModelSourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
