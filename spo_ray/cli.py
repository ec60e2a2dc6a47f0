"""The `spo-ray` command: discovers subcommands in `spo_ray.commands` (no central if-chain)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import spo_ray
from spo_ray import commands
from spo_ray.errors import UserError, is_disk_full
from spo_ray.logs import configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spo-ray",
        description="Align causal LMs with Soft Preference Optimization on Ray Train, Ray Data and vLLM.",
    )
    parser.add_argument("--version", action="version", version=f"spo_ray {spo_ray.__version__}")
    parser.add_argument(
        "--verbose",
        dest="log_verbose",
        action="store_true",
        help="show every library log line (Ray, vLLM, transformers); same as --set logging.level=info",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0 if args.command is None else 2
    configure_logging("info" if args.log_verbose else None)
    ray_was_running = _ray_running()  # a caller's runtime (tests, notebooks) is never shut down here
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        if not ray_was_running:
            _stop_ray()
        print(f"spo-ray: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        if not ray_was_running:
            _stop_ray()
        print(
            f"spo-ray: error: no space left on device while writing {exc.filename or 'a file'}; free some "
            "space and run the same command again (a training run resumes from its last complete checkpoint)",
            file=sys.stderr,
        )
        return 2


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _stop_ray() -> None:
    """Shut the runtime this command started down first, so Ray's forwarded logs end before the error line."""
    if _ray_running():
        sys.modules["ray"].shutdown()


if __name__ == "__main__":
    sys.exit(main())
