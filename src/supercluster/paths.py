"""Where supercluster keeps its state on this machine (one place, so every package agrees).

The state folder holds the fleet database, job folders, prepared data, measured peaks and
health baselines.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """supercluster's state folder: $SUPERCLUSTER_HOME, default ~/.supercluster."""
    return Path(os.environ.get("SUPERCLUSTER_HOME", Path.home() / ".supercluster"))


def model_library() -> Path:
    """Open models the operator imported for every project to serve or fine-tune."""
    return home() / "models"


def data_library() -> Path:
    """Datasets the operator shares with every project (read-only to their jobs)."""
    return home() / "datasets"


def project_area(project_id: int) -> Path:
    """One project's own files (its data, read by its jobs); relative paths in its jobs start here."""
    return home() / "projects" / f"p{project_id}"
