"""Run by tests/test_two_nodes.py through `ray job submit`: with `colocate`, rollout engines leave the
driver's node for the node of the process that calls `prefer_this_node()` (the trainers' rank 0 does).

Usage: python tests/colocate_probe.py MODEL_DIR TRAINER_NODE_ID; prints one JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from spo_ray.rollout import RolloutPool

    model_dir, trainer_node = sys.argv[1], sys.argv[2]
    ray.init()
    with RolloutPool(model_dir, backend="hf", colocate=True, timeout_s=120) as pool:
        started_on = pool.engine_info()[0]["node_id"]

        @ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(trainer_node, soft=False))
        def like_rank_0(pool: RolloutPool) -> tuple[str, int]:
            return ray.get_runtime_context().get_node_id(), pool.prefer_this_node()

        caller_node, moved = ray.get(like_rank_0.remote(pool))
        (samples,) = pool.generate([[1, 280, 201]], n=1, max_tokens=4)
        (info,) = pool.engine_info()
    report = {
        "driver_node": ray.get_runtime_context().get_node_id(),
        "started_on": started_on,
        "caller_node": caller_node,
        "moved": moved,
        "now_on": info["node_id"],
        "replaced": info["replaced"],
        "served_after_move": len(samples[0].token_ids) > 0,
    }
    print("COLOCATE " + json.dumps(report), flush=True)
