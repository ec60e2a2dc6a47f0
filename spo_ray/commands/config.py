"""`spo-ray config show`: print the resolved config with each key's help."""

from __future__ import annotations

import argparse

from spo_ray.config import Config, dump_yaml, load_config


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
    """The config of a run command: --config, --set overrides, then --output-dir (as output.dir)."""
    overrides = list(args.overrides) + ([f"output.dir={args.output_dir}"] if args.output_dir else [])
    return load_config(args.config, overrides)


def show(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(dump_yaml(cfg, with_help=not args.no_help))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="show the resolved config (YAML + overrides, validated)")
    actions = parser.add_subparsers(dest="config_command", metavar="ACTION")
    show_parser = actions.add_parser("show", help="print the resolved config with each key's help")
    add_config_arguments(show_parser)
    show_parser.add_argument("--no-help", action="store_true", help="omit the help comments")
    show_parser.set_defaults(run=show)
