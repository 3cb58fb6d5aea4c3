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
