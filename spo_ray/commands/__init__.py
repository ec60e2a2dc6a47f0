"""Subcommands of `spo-ray`: each module here exposes `register(subparsers)` and is discovered automatically."""
