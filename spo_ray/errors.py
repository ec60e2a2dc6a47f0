"""Errors meant for people: each says what was wrong, where, and what to do."""

from __future__ import annotations

import errno


class UserError(Exception):
    """A problem with the user's input (config, data, paths). The CLI prints it and exits 2."""

    exit_code = 2


class ConfigError(UserError):
    """A config key that is unknown, of the wrong type, out of range, or names a missing file."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"config key '{key}': {message}" if key else message)

    def __reduce__(self):  # rebuilt from (key, message) when Ray or pickle carries it between processes
        return type(self), (self.key, self.message)


class DataError(UserError):
    """A preference-data row that cannot be used; names file, line/row, field and reason."""


class DiskFullError(UserError):
    """A filesystem the run writes to ran out of space; the message names it and the last good checkpoint."""


def is_disk_full(exc: BaseException | None) -> bool:
    """True when `exc`, anything in its cause chain, or a worker traceback it carries says the disk is full."""
    seen, pending = set(), [exc]
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc):
            return True
        # Ray Train's WorkerGroupError carries each failed worker's exception
        pending += [exc.__cause__, exc.__context__, *getattr(exc, "worker_failures", {}).values()]
    return False
