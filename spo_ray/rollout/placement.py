"""Where rollout engine actors may run: Ray actor options from the config, and which live nodes fit.

Hard requirements are resources (CPUs, GPUs, custom resources such as `{"rollout": 1}`) and node labels;
the preferred node (`rollout.colocate`: the node of the trainers' rank 0) is soft, so an engine runs
elsewhere rather than not at all when that node cannot hold it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@dataclass
class Placement:
    """What one engine actor needs from a node, and the node it would rather run on."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom resources (hard)
    node_labels: dict[str, str] = field(default_factory=dict)  # node labels (hard)
    preferred_node: str | None = None  # soft affinity; None spreads engines over the cluster

    def actor_options(self) -> dict[str, Any]:
        """`ray.remote(...).options(**these)` for one engine actor."""
        options: dict[str, Any] = {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "scheduling_strategy": (
                NodeAffinitySchedulingStrategy(self.preferred_node, soft=True)
                if self.preferred_node
                else "SPREAD"
            ),
        }
        if self.resources:
            options["resources"] = dict(self.resources)
        if self.node_labels:
            options["label_selector"] = dict(self.node_labels)
        return options

    def fits(self, node: dict[str, Any]) -> bool:
        """True when the node (an entry of `ray.nodes()`) is alive and could hold one engine when idle."""
        totals, labels = node.get("Resources", {}), node.get("Labels", {})
        needed = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        return (
            bool(node.get("Alive"))
            and all(totals.get(name, 0.0) >= amount for name, amount in needed.items() if amount > 0)
            and all(labels.get(key) == value for key, value in self.node_labels.items())
        )

    def has_room_on(self, node_id: str) -> bool:
        """True when the live node `node_id` fits one engine and has the resources free right now."""
        node = next((n for n in ray.nodes() if n["NodeID"] == node_id), None)
        if node is None or not self.fits(node):
            return False
        from ray._private.state import available_resources_per_node  # no public per-node view in Ray 2.x

        free = available_resources_per_node().get(node_id, {})
        needed = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        return all(free.get(name, 0.0) >= amount for name, amount in needed.items() if amount > 0)

    def fitting_nodes(self) -> list[str]:
        """Ids of the live nodes that could hold one engine."""
        return [node["NodeID"] for node in ray.nodes() if self.fits(node)]

    def describe(self) -> str:
        """The config keys that decide placement, with their values, for error messages."""
        parts = [f"rollout.num_cpus_per_actor={self.num_cpus:g}"]
        if self.num_gpus:
            parts.append(f"rollout.num_gpus_per_actor={self.num_gpus:g}")
        if self.resources:
            parts.append(f"rollout.resources={self.resources}")
        if self.node_labels:
            parts.append(f"rollout.node_labels={self.node_labels}")
        return ", ".join(parts)

    def no_node_text(self) -> str:
        """Why no engine can start, and what to do."""
        how = []
        if self.resources:
            how.append(f"`ray start --resources '{_json(self.resources)}'`")
        if self.node_labels:
            how.append(
                "`ray start --labels " + ",".join(f"{k}={v}" for k, v in self.node_labels.items()) + "`"
            )
        start = " with " + " and ".join(how) if how else ""
        return (
            f"no live node of the Ray cluster can hold a rollout engine ({self.describe()}): start a node{start}, "
            "or change those keys"
        )


def _json(mapping: dict[str, float]) -> str:
    return "{" + ", ".join(f'"{k}": {v:g}' for k, v in mapping.items()) + "}"
