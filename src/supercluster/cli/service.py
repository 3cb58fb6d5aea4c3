"""`supercluster server | login | usage`: run the multi-tenant service, or talk to one."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Annotated, Optional

import typer

from supercluster.cli.flags import DbOption, JsonOption

ServerOption = Annotated[
    Optional[str],
    typer.Option("--server", envvar="SUPERCLUSTER_SERVER", help="URL of a supercluster server (default: the local database)."),
]

server_app = typer.Typer(help="The multi-tenant service: REST API over the fleet (OpenAPI at /docs).",
                         invoke_without_command=True)


@server_app.callback()
def server(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="Address to bind; loopback unless you mean to expose it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8765,
    db: DbOption = None,
):
    """Serve the API (run `supercluster server init` once first)."""
    if ctx.invoked_subcommand is not None:
        return
    import gc

    import uvicorn

    from supercluster.service.app import create_app

    # every 5 s the server stops projects past their budget and starts what the queues allow
    app = create_app(db, tick_s=5.0)
    # Everything loaded by now (the libraries, the app) lives as long as the server. Frozen out of
    # the collector's sight, a full collection scans only what requests made: a few ms instead of
    # the 40-60 ms that were the slowest requests' tail. (Garbage first, so none is frozen with it.)
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=host, port=port, log_level="warning")


@server_app.command("init")
def server_init(db: DbOption = None, as_json: JsonOption = False):
    """Create the service's tables and print the operator's token (shown this once)."""
    from supercluster.errors import UserError
    from supercluster.service import tenancy
    from supercluster.service.auth import ServiceError
    from supercluster.service.store import Store

    store = Store(db)
    try:
        with store.session() as s:
            token = tenancy.init_operator(s)
    except ServiceError as err:
        raise UserError(err.message) from None
    finally:
        store.dispose()
    if as_json:
        print(json.dumps({"schema_revision": store.revision, "token": token}))
    else:
        print(f"service schema at revision {store.revision}\noperator token (shown once; keep it secret):\n{token}")


def login(
    server: Annotated[str, typer.Option("--server", envvar="SUPERCLUSTER_SERVER", help="URL of the server.")],
    token: Annotated[Optional[str], typer.Option("--token", help="API token (default: read from stdin or prompt).")] = None,
):
    """Store a token for a server (in $SUPERCLUSTER_HOME/service.json, mode 0600) after checking it."""
    from supercluster.service import client

    if token is None:
        token = sys.stdin.readline().strip() if not sys.stdin.isatty() else typer.prompt("token", hide_input=True)
    mine = client.call(server, "GET", "/v1/tokens", token=token)
    path = client.save_login(server, token)
    who = mine[0] if mine else {}
    print(f"logged in to {server} as {who.get('user', '?')} ({who.get('role', '?')} in {who.get('project') or 'the fleet'}); "
          f"token stored in {path}")


def _epoch(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a date; write it like 2026-12-01 or 2026-12-01T12:00.") from None


def usage(
    by: Annotated[str, typer.Option("--by", help="org, project or user.")] = "project",
    since: Annotated[Optional[str], typer.Option("--since", help="Start of the period (ISO date).")] = None,
    until: Annotated[Optional[str], typer.Option("--until", help="End of the period (ISO date; default now).")] = None,
    server: ServerOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
):
    """GPU-hours and cost by org, project or user and GPU type."""
    from supercluster.errors import UserError
    from supercluster.service import client, usage as usage_mod

    if by not in usage_mod.GROUPS:
        raise UserError(f"--by {by!r} is not one of {', '.join(usage_mod.GROUPS)}; pick one.")
    query = {"by": by, "since": _epoch(since), "until": _epoch(until)}
    url = client.server_url(server)
    if url:
        rows = client.call(url, "GET", "/v1/usage", query=query)["rows"]
    else:
        from supercluster.service.store import Store

        store = Store(db)
        try:
            with store.session() as s:
                rows = usage_mod.report(s, by=by, since=query["since"], until=query["until"])
        finally:
            store.dispose()
    if as_json:
        print(json.dumps({"by": by, "rows": rows}, indent=1, sort_keys=True))
    elif as_csv:
        sys.stdout.write(usage_mod.to_csv(rows))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"usage by {by}")
        for col in ("org", "project", "user", "gpu type", "GPU-hours", "$/GPU-hour", "cost $"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["org"] or "-", r["project"] or "-", r["user"] or "-", r["gpu_type"], f"{r['gpu_hours']:.3f}",
                          "-" if r["usd_per_gpu_hour"] is None else f"{r['usd_per_gpu_hour']:.2f}",
                          "-" if r["cost_usd"] is None else f"{r['cost_usd']:.2f}")
        Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(server_app, name="server")
    app.command("login")(login)
    app.command("usage")(usage)
