"""Backends: where nodes come from and how a job's processes are started.

`local` is this machine, `slurm` a real Slurm cluster driven through its commands, `sim` a
simulated fleet for placement (it runs no jobs). Each implements `Backend` (base.py);
`registry.backend_for` picks one by name.
"""

from __future__ import annotations

from supercluster.cluster.backends.base import BACKENDS, Backend, JobSpec, JobStatus, NodeSpec, canonical_gpu_type, node_command, train_command

__all__ = ["BACKENDS", "Backend", "JobSpec", "JobStatus", "NodeSpec", "canonical_gpu_type", "node_command", "train_command"]
