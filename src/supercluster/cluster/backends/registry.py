"""The backend of a fleet by name (its module is imported only when that backend is used)."""

from __future__ import annotations

from supercluster.cluster.backends.base import BACKENDS, Backend
from supercluster.errors import UserError


def backend_for(name: str, settings: dict | None = None) -> Backend:
    """A `Backend` for `name` (one of BACKENDS) with the fleet's stored settings."""
    if name == "sim":
        from supercluster.cluster.backends.sim import SimBackend as cls
    elif name == "local":
        from supercluster.cluster.backends.local import LocalBackend as cls
    elif name == "slurm":
        from supercluster.cluster.backends.slurm import SlurmBackend as cls
    else:
        raise UserError(f"Unknown backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    return cls(settings)
