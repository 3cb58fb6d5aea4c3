"""A simulated fleet: a fat tree of identical nodes built from a spec, for placement only.

Spec (TOML), every key optional; the defaults build 1,280 nodes x 8 H100 = 10,240 GPUs,
32 nodes per leaf switch, 16 leaves per pod:

    gpu_type = "h100"
    nodes = 1280
    gpus_per_node = 8
    nodes_per_leaf = 32
    leaves_per_pod = 16

or several `[[group]]` tables with those keys for a mixed fleet.
"""

from __future__ import annotations

from supercluster.cluster.backends.base import Backend, NodeSpec, canonical_gpu_type
from supercluster.errors import UserError

DEFAULT_SPEC = {"gpu_type": "h100", "nodes": 1280, "gpus_per_node": 8, "nodes_per_leaf": 32, "leaves_per_pod": 16}


def build(spec: dict) -> list[NodeSpec]:
    groups = spec.get("group") or [spec]
    nodes: list[NodeSpec] = []
    leaf_base = pod_base = 0
    for group in groups:
        unknown = set(group) - set(DEFAULT_SPEC) - {"group"}
        if unknown:
            raise UserError(f"Unknown fleet spec key {sorted(unknown)[0]!r}; use {', '.join(DEFAULT_SPEC)}.")
        g = {**DEFAULT_SPEC, **{k: v for k, v in group.items() if k != "group"}}
        for key in ("nodes", "gpus_per_node", "nodes_per_leaf", "leaves_per_pod"):
            if not isinstance(g[key], int) or g[key] < 1:
                raise UserError(f"Fleet spec {key} must be a positive integer, got {g[key]!r}.")
        gpu_type = canonical_gpu_type(str(g["gpu_type"]))
        for i in range(g["nodes"]):
            leaf = leaf_base + i // g["nodes_per_leaf"]
            pod = pod_base + pod_in_group(i, g)
            nodes.append(NodeSpec(f"sim{len(nodes) + 1:05d}", gpu_type, g["gpus_per_node"], f"leaf{leaf + 1:04d}", f"pod{pod + 1:03d}"))
        leaf_count = -(-g["nodes"] // g["nodes_per_leaf"])
        leaf_base += leaf_count
        pod_base += -(-leaf_count // g["leaves_per_pod"])
    return nodes


def pod_in_group(i: int, g: dict) -> int:
    """The pod (within its group) of the group's i-th node."""
    return (i // g["nodes_per_leaf"]) // g["leaves_per_pod"]


class SimBackend(Backend):
    name = "sim"

    def discover(self) -> list[NodeSpec]:
        self.settings.setdefault("spec", DEFAULT_SPEC)
        return build(self.settings["spec"])
