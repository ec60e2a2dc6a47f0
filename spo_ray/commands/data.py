"""`spo-ray data validate|inspect PATH`: check preference data and look at normalized examples."""

from __future__ import annotations

import argparse

from spo_ray.data.schema import FORMATS


def validate(args: argparse.Namespace) -> int:
    """Print counts by reason and the first 20 problems; 0 when every row is good, else 2."""
    from spo_ray.data.checks import validate_paths

    report = validate_paths(
        args.paths,
        args.format,
        args.tokenizer,
        args.max_length,
        args.max_prompt_length,
        args.on_long_rows,
        args.dimension,
    )
    print(report.render(limit=20))
    if report.rows_read == 0:
        print("no rows found")
        return 2
    return 0 if not report.bad else 2


def inspect(args: argparse.Namespace) -> int:
    """Print the first --n normalized examples (templated when --tokenizer is given)."""
    from spo_ray.data.checks import inspect_paths

    print(
        inspect_paths(
            args.paths, args.n, args.format, args.tokenizer, args.max_length, args.max_prompt_length
        )
    )
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="JSONL/JSON/Parquet/CSV files, globs, or folders"
    )
    parser.add_argument(
        "--format", default="auto", choices=("auto", *FORMATS), help="row format (default: detected per row)"
    )
    parser.add_argument(
        "--tokenizer", metavar="DIR", help="model folder whose tokenizer and chat template to use"
    )
    parser.add_argument("--max-length", type=int, default=512, help="as data.max_length (needs --tokenizer)")
    parser.add_argument(
        "--max-prompt-length", type=int, default=256, help="as data.max_prompt_length (needs --tokenizer)"
    )
    parser.add_argument(
        "--on-long-rows",
        default="truncate",
        choices=("truncate", "skip", "error"),
        help="as data.on_long_rows: cut responses to fit --max-length, or count the row as too_long",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `data validate` and `data inspect` to the CLI."""
    parser = subparsers.add_parser("data", help="validate or inspect preference data")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    check = actions.add_parser(
        "validate", help="read every row; print counts by reason; exit 2 with the first 20 problems"
    )
    _common(check)
    check.add_argument(
        "--dimension",
        default="",
        help="as data.dimension: only rows labelled with it count; a row without a usable label is bad",
    )
    check.set_defaults(run=validate)
    show = actions.add_parser(
        "inspect", help="show the first normalized examples (templated with --tokenizer)"
    )
    _common(show)
    show.add_argument("--n", type=int, default=3, help="examples to show")
    show.set_defaults(run=inspect)
