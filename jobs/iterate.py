"""Entrypoint for `ray job submit --working-dir . -- python jobs/iterate.py --config ...` (iterative rounds).

Thin on purpose: all logic lives in `spo_ray.iterative`. Inside a submitted job RAY_ADDRESS is set, so the
run joins the cluster instead of starting a local runtime; re-submitting resumes mid-round.
When the job's `python` is not the project's environment, it re-runs with the cluster's (project_python.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from project_python import ensure_project_python  # this folder is sys.path[0]

if __name__ == "__main__":
    ensure_project_python()
    # The uploaded working dir holds the package; make it importable when spo_ray is not pip-installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from spo_ray.cli import main

    sys.exit(main(["iterate", *sys.argv[1:]]))
