"""The backend of a fleet by name."""

from __future__ import annotations

from supercluster.cluster.backends.base import BACKENDS, Backend
from supercluster.cluster.backends.local import LocalBackend
from supercluster.cluster.backends.sim import SimBackend
from supercluster.cluster.backends.slurm import SlurmBackend
from supercluster.errors import UserError

_CLASSES: dict[str, type[Backend]] = {"local": LocalBackend, "slurm": SlurmBackend, "sim": SimBackend}


def backend_for(name: str, settings: dict | None = None) -> Backend:
    """A `Backend` for `name` (one of BACKENDS) with the fleet's stored settings."""
    if name not in _CLASSES:
        raise UserError(f"Unknown backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    return _CLASSES[name](settings)
