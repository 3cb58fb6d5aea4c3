"""Options shared by every area's commands, defined once so they read and behave the same
everywhere (SkyPilot keeps its shared flags the same way)."""

from __future__ import annotations

import math
import socket
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
ServerOption = Annotated[
    Optional[str],
    typer.Option("--server", envvar="SUPERCLUSTER_SERVER", help="URL of a supercluster server (default: the local database)."),
]
ProjectOption = Annotated[
    Optional[str],
    typer.Option("--project", envvar="SUPERCLUSTER_PROJECT",
                 help="With --server: the project to act in (default: the one the stored token is scoped to)."),
]


def real(low: float | None = None, high: float | None = None, low_open: bool = False):
    """A callback for a float flag: finite (TOML and Python both read `nan` and `inf`), and within
    [low, high], or (low, high] when `low_open`. Typer's own min/max let inf through."""
    span = (f"{'[' if low is not None and not low_open else '('}{'-inf' if low is None else f'{low:g}'}, "
            f"{'inf)' if high is None else f'{high:g}]'}")

    def check(value: float | None) -> float | None:
        if value is None:
            return value
        below = low is not None and (value <= low if low_open else value < low)
        if not math.isfinite(value) or below or (high is not None and value > high):
            raise typer.BadParameter(f"must be a number in {span}, got {value:g}.")
        return value
    return check


def listen(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A server's listening socket, bound before the slow start-up work and before its URL is
    printed (a client reading it may connect at once); a port in use is one sentence.
    reuse_port: sockets of the same user may bind the port beside it (`service.workers`)."""
    from supercluster.errors import UserError

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"Cannot listen on {host}:{port} ({err.strerror}); pass --port with a free port or --host with "
                        "an address of this machine.") from None
    sock.listen(2048)
    return sock
