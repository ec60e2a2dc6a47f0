"""The project's python for `ray job submit -- python jobs/...`: re-run with the cluster's own interpreter.

The job's `python` is whichever one was first on PATH when `ray start` ran, often not the project's
virtualenv (then `import torch` fails). `ensure_project_python()` re-runs the entrypoint with the
interpreter the cluster itself runs on (the job supervisor's: it has ray, torch and spo_ray's
dependencies). Standard library only: it runs before those imports can work.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REEXEC_FLAG = "SPO_RAY_JOB_REEXEC"


def cluster_python() -> str | None:
    """The python of the Ray worker that started this job (an ancestor process): the one whose loaded
    modules live in a `site-packages/ray/` folder, as `VENV/bin/python`. Linux only (reads /proc)."""
    pid = os.getppid()
    while pid > 1:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text(errors="replace")
            parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
        except OSError:
            return None
        for line in maps.splitlines():
            path = line.split(maxsplit=5)[-1]
            if "/site-packages/ray/" in path and "/lib/python" in path:
                candidate = Path(path.split("/lib/python")[0]) / "bin" / "python"
                if candidate.exists():
                    return str(candidate)
        pid = int(parent)
    return None


def ensure_project_python() -> None:
    """Re-run the entrypoint with the cluster's python when the job's `python` lacks ray or torch."""
    try:
        import ray  # noqa: F401
        import torch  # noqa: F401

        return
    except ImportError as exc:
        missing = exc.name
    python = None if os.environ.get(REEXEC_FLAG) else cluster_python()
    if python is None or python == sys.executable:  # (a venv python resolves to its base: compare unresolved)
        sys.exit(
            f"{sys.argv[0]}: {sys.executable} has no module '{missing}', and the Ray cluster's own python "
            f"was not found. The job's `python` is the first one on PATH when `ray start` ran: start the head with "
            f"the project's environment active (`source .venv/bin/activate && ray start --head`), or submit "
            f"`-- /path/to/.venv/bin/python {sys.argv[0]} ...`"
        )
    print(f"{sys.argv[0]}: {sys.executable} has no module '{missing}'; re-running with {python}", flush=True)
    os.environ[REEXEC_FLAG] = "1"
    os.execv(python, [python, *sys.argv])
