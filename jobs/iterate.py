"""Entrypoint for `ray job submit --working-dir . -- python jobs/iterate.py --config ...` (iterative rounds).

Thin on purpose: all logic lives in `spo_ray.iterate`. Inside a submitted job RAY_ADDRESS is set, so the
run joins the cluster instead of starting a local runtime; re-submitting resumes mid-round.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The uploaded working dir holds the package; make it importable when spo_ray is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spo_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["iterate", *sys.argv[1:]]))
