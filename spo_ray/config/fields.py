"""`option` and `section`: a config field with its default, one-line help and range checks."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(default: Any, help: str, **checks: Any) -> Any:
    """A config field: default, one-line help, and checks (gt, ge, lt, le, must_exist)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})
