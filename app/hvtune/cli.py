"""`hvtune` command line: parses arguments and wires the stages together; no logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hvtune.config.layering import resolve_keys
from hvtune.config.rules import check_device_support
from hvtune.config.settings import ResolvedConfig, load_config
from hvtune.errors import ConfigError, UserError
from hvtune.flavours import TASKS
from hvtune.masking import mask_secrets
from hvtune.output.compare import Tolerances
from hvtune.run_files import RunFiles, files_for_each_tool, which_file_line

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2


def _cache_library_log(resolved: ResolvedConfig) -> Path:
    return Path(resolved.train.cache_dir) / "libraries.log"


# where each command's other-library output goes (hvtune.library_logs); None: nowhere unless --verbose
LIBRARY_LOGS: dict[str, Callable[[ResolvedConfig], Path]] = {
    "train": lambda r: RunFiles(r.train.output_dir).library_log,
    "cache": _cache_library_log,
    "fetch": _cache_library_log,
}


def _config(args: argparse.Namespace) -> ResolvedConfig:
    from hvtune.library_logs import route_library_output

    # plan answers before the clips are uploaded: a missing dataset folder is not an error there
    resolved = load_config(args.config, argv=args.overrides, check_paths=args.command != "plan")
    log = LIBRARY_LOGS.get(args.command)
    route_library_output(log(resolved) if log else None, verbose=args.verbose)
    for notice in resolved.notices:
        print(f"notice: {notice}", file=sys.stderr)
    return resolved


def cmd_check(args: argparse.Namespace) -> int:
    from hvtune.model.registry import detect_device
    from hvtune.output.preflight import preflight_problems

    resolved = _config(args)
    problems = check_device_support(resolved.train, detect_device(), str(resolved.config_path or "config"))
    if problems:
        raise ConfigError(problems)
    # every refusal `train` would make before its first step, decided by the same functions (output/preflight.py)
    notices: list[str] = []
    local = preflight_problems(resolved, notices)
    for notice in notices:
        print(f"notice: {notice}", file=sys.stderr)
    if local:
        raise UserError(f"{len(local)} problem(s) found:\n" + "\n".join(f"  - {p}" for p in local))
    values = mask_secrets(resolved.train.model_dump(mode="json"))
    width = max(map(len, values))
    from hvtune.config.simpletuner import KEPT_DEFAULTS
    from hvtune.data.buckets import dataset_bucket_rule, simpletuner_bucket

    print(f"config: {resolved.config_path or '(none: defaults, environment and flags)'}")
    for key, value in values.items():
        source = resolved.sources.get(key, "default")
        field = type(resolved.train).model_fields.get(key)
        st_key = (field.alias if field else None) or key
        kept = KEPT_DEFAULTS.get(st_key) if source == "default" else None
        kept = f"  (differs from SimpleTuner: {kept})" if kept else ""
        print(f"  {key:<{width}}  {value!r:<40}  {source}{kept}")
    print(f"datasets: {resolved.backend_path or '(from instance_data_dir)'}")
    for ds in resolved.datasets:
        state = "disabled" if ds.skipped else ds.dataset_type
        print(f"  {ds.id}: {state} {ds.instance_data_dir or ds.cache_dir or ''}")
        if not ds.skipped and ds.dataset_type in ("video", "image"):
            rule = dataset_bucket_rule(ds, resolved)
            sizes = ", ".join(
                f"{w}x{h} ({label}) -> {'x'.join(map(str, simpletuner_bucket(w, h, rule)))}"
                for w, h, label in ((1920, 1080, "16:9"), (1080, 1920, "9:16"))
            )
            print(f"    buckets: {sizes}  [{rule.describe()}]")
            if ds.dataset_type == "video" and ds.video.frame_rate:
                print(f"    video.frame_rate {ds.video.frame_rate:g}: resampled (SimpleTuner 4.10.1 does not resample)")
    print("config OK")
    if detect_device() != "cpu":  # a GPU is visible: will the configured setting fit it (simulated, ~1 min)
        from hvtune.plan.report import gpu_verdict

        print(gpu_verdict(resolved))
    return EXIT_OK


def cmd_rendezvous(args: argparse.Namespace) -> int:
    import os

    # c10d logs every retried connect with a C++ stack trace; the outcome is our one line
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    from hvtune.rendezvous import check_rendezvous, machines_from_environment

    flags = {"NUM_MACHINES": args.machines, "MACHINE_RANK": args.rank, "MAIN_PROCESS_IP": args.address}
    flags |= {"MAIN_PROCESS_PORT": args.port, "HVTUNE_RENDEZVOUS_TIMEOUT": args.timeout}
    machines = machines_from_environment({k: v for k, v in flags.items() if v is not None})
    print(check_rendezvous(machines), file=sys.stderr)
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from hvtune.plan.report import plan_report

    report = plan_report(
        _config(args), args.gpu, caption_tokens=args.caption_tokens, verdict_only=args.verdict, gpus=args.gpus,
        interconnect=args.interconnect,
    )  # fmt: skip
    print(report)
    return EXIT_OK


def cmd_config_get(args: argparse.Namespace) -> int:
    """KEY<TAB>SOURCE<TAB>VALUE per key, the value last so that an empty one survives `read` in a shell."""
    for key, value, source in resolve_keys(args.config, args.keys):
        text = "" if value is None else json.dumps(value) if isinstance(value, list | dict) else str(value)
        print(f"{key}\t{source}\t{text}")
    return EXIT_OK


def cmd_fetch(args: argparse.Namespace) -> int:
    from hvtune.model.registry import resolve_model

    resolved = _config(args)
    paths = resolve_model(resolved.train)
    for name, path in paths.components.items():
        print(f"  {name:<18} {path}  ({paths.origins[name]})")
    print("all components present")
    return EXIT_OK


def cmd_cache(args: argparse.Namespace) -> int:
    from hvtune.cache.build import build_cache
    from hvtune.cache.verify import print_verify
    from hvtune.output.status import recorded

    resolved = _config(args)
    if args.action == "verify":
        return print_verify(resolved)
    with recorded(resolved.train.output_dir, "caching", done="cached"):
        build_cache(resolved)
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from hvtune.output.run_dir import output_dir_lock
    from hvtune.output.status import recorded
    from hvtune.plan.report import preflight
    from hvtune.trainer import train

    resolved = _config(args)
    out = Path(resolved.train.output_dir)
    with output_dir_lock(out), recorded(out):  # the lock first: a refused second run writes nothing there
        resolved = preflight(resolved)  # every phase fits this GPU, decided before step 1 (skipped on the CPU)
        result = train(resolved)
    if not result.is_main_process:
        return EXIT_OK
    if result.already_finished:
        print(
            f"already finished at step {result.global_step}, outputs in {result.output_dir} (raise max_train_steps "
            "to continue it)"
        )
    elif result.stopped_early:
        print(f"stopped at step {result.global_step}; checkpoint in {RunFiles(result.output_dir).checkpoints}")
    else:
        files = RunFiles(result.output_dir)
        print(
            f"done: {result.global_step} steps in {files.root}; {which_file_line(files)}; record: {files.record.name}"
        )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from hvtune.cache.build import build_cache
    from hvtune.library_logs import route_library_output
    from hvtune.testing.demo import write_demo_project
    from hvtune.trainer import train

    route_library_output(RunFiles(args.dir.resolve() / "output").library_log, verbose=args.verbose)
    config_path = write_demo_project(args.dir.resolve(), task=args.task, steps=args.steps)
    print(f"demo project: {config_path.parent.parent}")
    resolved = load_config(config_path, argv=args.overrides)
    build_cache(resolved)
    result = train(resolved)
    out = RunFiles(result.output_dir)
    print("\ndemo finished:")
    for label, path in [
        *[(f"LoRA for {tool}", path) for tool, path in files_for_each_tool(out)],
        ("validation videos", out.validation_root),
        ("loss curve", out.loss_plot),
        ("run record", out.record),
        ("config", config_path),
    ]:
        print(f"  {label:<18} {path}")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from hvtune.output.compare import compare_runs, format_comparison

    tol = Tolerances(args.loss_rtol, args.weight_rtol, args.min_cosine)
    result = compare_runs(args.run_a, args.run_b, tol, plot=args.plot)
    print(format_comparison(result, tol))
    if result.plot:
        print(f"loss overlay: {result.plot}")
    return result.exit_code


def cmd_serve(args: argparse.Namespace) -> int:
    from hvtune.serve.server import serve

    serve(args.output_dir, host=args.host, port=args.port, token=args.token, allow_stop=not args.read_only)
    return EXIT_OK


def cmd_synth_dataset(args: argparse.Namespace) -> int:
    from hvtune.testing.synth import write_synthetic_dataset

    files = write_synthetic_dataset(args.out, clips=args.clips, seed=args.seed)
    print(f"{len(files)} clips with captions written to {args.out}")
    return EXIT_OK


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from hvtune.testing.tiny_model import write_tiny_model

    out = write_tiny_model(args.out, task=args.task, seed=args.seed)
    print(f"tiny {args.task} model written to {out}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hvtune", description="LoRA training appliance for HunyuanVideo 1.5")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_ + " Extra --key=value flags override config keys.")
        p.add_argument("--config", type=Path, help="SimpleTuner-style config.json (optional)")
        p.add_argument("--verbose", action="store_true", help="also show other libraries' warnings and log records")
        p.set_defaults(func=func, takes_overrides=True)
        return p

    with_config("check", cmd_check, "Validate the config and show every resolved value with its source.")
    p = with_config("plan", cmd_plan, "Predict GPU memory, host RAM and s/step: the full-size step on meta tensors.")
    p.add_argument("--gpu", help="a card (RTX 4090, A100 80, H100, ...), a size (24GB) or auto: list what fits")
    p.add_argument(
        "--caption-tokens", type=int, help="Qwen tokens per caption (default: the longest in a built cache, else 256)"
    )
    p.add_argument("--verdict", action="store_true", help="one line: does the configured setting fit the card")
    p.add_argument("--gpus", type=int, help="also per GPU on up to N GPUs: DDP, FSDP2, context parallel")
    p.add_argument("--interconnect", help="link between the GPUs for --gpus: pcie4, pcie5, nvlink4, ib-ndr, ...")
    with_config("fetch", cmd_fetch, "Resolve or download every model component the flavour needs.")
    p = with_config("cache", cmd_cache, "Encode text, video latents and i2v conditions once (or verify the cache).")
    p.add_argument("action", nargs="?", choices=["build", "verify"], default="build")
    with_config("train", cmd_train, "Train the LoRA from the cache.")
    _add_config_get(sub)
    _add_rendezvous(sub)
    _add_run_tools(sub)
    _add_test_tools(sub)
    return parser


def _add_config_get(sub) -> None:
    p = sub.add_parser(
        "config",
        help="Print resolved training keys: KEY, its source and its value, tab-separated (for scripts).",
        description="`hvtune config get KEY...`: each key's value after the config file, HVTUNE_<KEY> variables and "
        "defaults are layered as for training, one line per key: KEY<TAB>SOURCE<TAB>VALUE (empty when unset).",
    )
    p.add_argument("action", choices=["get"])
    p.add_argument("keys", nargs="+", metavar="KEY")
    p.add_argument("--config", type=Path, help="SimpleTuner-style config.json (optional)")
    p.set_defaults(func=cmd_config_get)


def _add_rendezvous(sub) -> None:
    p = sub.add_parser(
        "rendezvous",
        help="Several machines: check every machine reaches machine rank 0 (the containers run it before training).",
        description="Machine rank 0 waits on MAIN_PROCESS_PORT for the others; each other machine connects to "
        "MAIN_PROCESS_IP:MAIN_PROCESS_PORT. Within the timeout, or one line naming the address and port tried. "
        "Each flag defaults to its environment variable.",
    )
    p.add_argument("--machines", help="NUM_MACHINES (default 1)")
    p.add_argument("--rank", help="MACHINE_RANK (default 0)")
    p.add_argument("--address", help="MAIN_PROCESS_IP")
    p.add_argument("--port", help="MAIN_PROCESS_PORT (default 29500)")
    p.add_argument("--timeout", help="seconds, HVTUNE_RENDEZVOUS_TIMEOUT (default 600)")
    p.set_defaults(func=cmd_rendezvous)


def _add_run_tools(sub) -> None:
    """demo, compare, serve: commands about whole runs."""
    p = sub.add_parser("demo", help="Tiny model + synthetic clips: cache, train, validate, export (minutes, CPU).")
    p.add_argument("--dir", type=Path, default=Path("demo"))
    p.add_argument("--task", choices=list(TASKS), default="t2v")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--verbose", action="store_true", help="also show other libraries' warnings and log records")
    p.set_defaults(func=cmd_demo, takes_overrides=True)

    p = sub.add_parser("compare", help="Compare two runs: identical (exit 0), equivalent (3) or different (4).")
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--loss-rtol", type=float, default=Tolerances.loss_rtol)
    p.add_argument("--weight-rtol", type=float, default=Tolerances.weight_rtol)
    p.add_argument("--min-cosine", type=float, default=Tolerances.min_cosine)
    p.add_argument(
        "--plot", type=Path, default=Path("compare_loss.png"), help="loss overlay PNG (default: ./compare_loss.png)"
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("serve", help="The run page: live state, loss curve, videos, downloads (two folders: compare).")
    p.add_argument("output_dir", type=Path, nargs="+", metavar="OUTPUT_DIR", help="a run's output_dir (or two)")
    p.add_argument("--host", help="address to listen on (default HVTUNE_PAGE_HOST or 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, help="default HVTUNE_PAGE_PORT or 8765; 0 picks a free one")
    p.add_argument("--token", help="required token (default HVTUNE_PAGE_TOKEN, else generated; printed in the link)")
    p.add_argument("--read-only", action="store_true", help="no stop button")
    p.set_defaults(func=cmd_serve)


def _add_test_tools(sub) -> None:
    """synth-dataset, tiny-model: the stand-ins tests and the demo use."""
    p = sub.add_parser("synth-dataset", help="Write synthetic clips of moving shapes with captions.")
    p.add_argument("out", type=Path)
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth_dataset)

    p = sub.add_parser("tiny-model", help="Write a tiny random HunyuanVideo 1.5 pipeline (tests, demo).")
    p.add_argument("out", type=Path)
    p.add_argument("--task", choices=list(TASKS), default="t2v")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted: stopped at once; anything since the last checkpoint is lost", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
