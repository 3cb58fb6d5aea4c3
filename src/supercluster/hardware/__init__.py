"""The hardware catalog: accelerators, node types and their health pass marks (torch-free)."""

from supercluster.hardware.catalog import (
    ACCELERATORS,
    NODE_TYPES,
    Accelerator,
    NodeType,
    accelerator,
    default_node_type,
    node_type,
)

__all__ = [
    "ACCELERATORS",
    "NODE_TYPES",
    "Accelerator",
    "NodeType",
    "accelerator",
    "default_node_type",
    "node_type",
]
