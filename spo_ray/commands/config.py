"""`spo-ray config show`: print the resolved config with each key's help."""

from __future__ import annotations

import argparse
import sys

from spo_ray.config import Config, dump_yaml, load_config, missing_files


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--config FILE --set k=v` pair shared by every command that reads a config."""
    parser.add_argument("--config", help="YAML config file (defaults apply where it is silent)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set loss.alpha=0.5 (repeatable)",
    )


def load_run_config(args: argparse.Namespace) -> Config:
    """The config of a run command: --config, --set overrides, --output-dir (as output.dir), and the global
    --verbose (as logging.level=info)."""
    overrides = list(args.overrides) + ([f"output.dir={args.output_dir}"] if args.output_dir else [])
    if getattr(args, "log_verbose", False):
        overrides.append("logging.level=info")
    return load_config(args.config, overrides)


def show(args: argparse.Namespace) -> int:
    """Print the config; files it names that do not exist here (a cluster recipe on a laptop) are warnings:
    a run still refuses them, naming the key."""
    cfg = load_config(args.config, args.overrides, check_files=False)
    for problem in missing_files(cfg):
        print(f"spo-ray: warning: {problem} here; a run on this machine would stop at it", file=sys.stderr)
    print(dump_yaml(cfg, with_help=not args.no_help))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="show the resolved config (YAML + overrides, validated)")
    actions = parser.add_subparsers(dest="config_command", metavar="ACTION")
    show_parser = actions.add_parser("show", help="print the resolved config with each key's help")
    add_config_arguments(show_parser)
    show_parser.add_argument("--no-help", action="store_true", help="omit the help comments")
    show_parser.set_defaults(run=show)
