"""Options shared by every area's commands, defined once so they read and behave the same
everywhere (SkyPilot keeps its shared flags the same way)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON with stable keys instead of a table.")]
DbOption = Annotated[
    Optional[str],
    typer.Option("--db", envvar="SUPERCLUSTER_DB",
                 help="SQLAlchemy URL of the fleet database (default: $SUPERCLUSTER_HOME/fleet.db)."),
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a config key: --set train.steps=50 (repeatable)."),
]
