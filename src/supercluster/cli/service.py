"""`supercluster server | login | usage | endpoint`: run the multi-tenant service, or talk to one."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Annotated, Optional

import typer

from supercluster.cli.flags import DbOption, JsonOption, ProjectOption, ServerOption, listen
from supercluster.client import connect
from supercluster.limits import MAX_ID
from supercluster.serve.quantizations import DEFAULT as DEFAULT_QUANTIZATION
from supercluster.serve.quantizations import QUANTIZATIONS

server_app = typer.Typer(help="The multi-tenant service: REST API over the fleet (OpenAPI at /docs).",
                         invoke_without_command=True)


@server_app.callback()
def server(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="Address to bind; loopback unless you mean to expose it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8765,
    db: DbOption = None,
    workers: Annotated[int, typer.Option("--workers", min=1, max=64, help="Processes answering on the port, over one "
                                         "database (e.g. the machine's cores); 1 by default.")] = 1,
):
    """Serve the API (run `supercluster server init` once first)."""
    if ctx.invoked_subcommand is not None:
        return
    from supercluster.service import workers as server_workers
    from supercluster.service.store import Store

    Store(db).dispose()  # the database opens (and migrates) once here: a wrong URL is one sentence before anything listens
    sock = listen(host, port, reuse_port=workers > 1)
    base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    print(f"serving the API on {base}/v1 (OpenAPI at {base}/docs), the dashboard on {base}/dashboard"
          + (f", {workers} worker processes" if workers > 1 else ""), flush=True)
    # every 5 s the server stops projects past their budget and starts what the queues allow
    raise typer.Exit(server_workers.serve(db, sock, workers))


@server_app.command("init")
def server_init(
    backend: Annotated[Optional[str], typer.Option("--backend", help="Also import the fleet's nodes from local, slurm or sim "
                                                   "(default: local, unless the database already has a fleet).")] = None,
    gpus: Annotated[Optional[int], typer.Option("--gpus", help="local: GPU slots on this machine (default: devices, or CPU cores).")] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
):
    """Create the service's tables and the fleet on the same database, and print the operator's token (shown this once)."""
    from supercluster.cluster.fleet import fleet_exists, init_fleet
    from supercluster.errors import UserError
    from supercluster.service import tenancy
    from supercluster.service.auth import ServiceError
    from supercluster.service.store import Store

    store = Store(db)
    try:
        with store.reading() as s:  # before the fleet: a second init changes nothing
            tenancy.refuse_if_initialized(s)
        fleet = None
        exists = fleet_exists(store.fleet)
        if exists and (backend or gpus):  # replaced only by `fleet init --force`, which checks it holds no clusters
            raise UserError("The database already has a fleet; leave out --backend and --gpus to keep it, "
                            "or replace it first with `supercluster fleet init --force`.")
        if not exists:
            fleet = init_fleet(store.fleet, backend or "local", **({"gpus": gpus} if gpus else {}))
            fleet.pop("node_list")
        with store.session() as s:
            token = tenancy.init_operator(s)
    except ServiceError as err:
        raise UserError(err.message) from None
    finally:
        store.dispose()
    if as_json:
        print(json.dumps({"schema_revision": store.revision, "token": token, "fleet": fleet}))
        return
    if fleet:
        print(f"fleet on {fleet['backend']}: {fleet['nodes']} node(s), {fleet['gpus']} GPUs ({', '.join(fleet['gpu_types'])})")
    # the token alone on the last line, so that `| tail -n1` hands it to `login`
    print(f"service schema at revision {store.revision}\noperator token (shown once; keep it secret):\n{token}")


def login(
    server: Annotated[str, typer.Option("--server", envvar="SUPERCLUSTER_SERVER", help="URL of the server.")],
    token: Annotated[Optional[str], typer.Option("--token", help="API token (default: read from stdin or prompt).")] = None,
):
    """Store a token for a server (in $SUPERCLUSTER_HOME/service.json, mode 0600) after checking it."""
    from supercluster.errors import UserError
    from supercluster.service import client

    client.checked_url(server)
    if token is None:
        token = sys.stdin.readline() if not sys.stdin.isatty() else typer.prompt("token", hide_input=True)
    token = token.strip()
    if not token:
        raise UserError("The token is empty; pass --token, or pipe in the one `server init` or `token create` printed.")
    who = client.call(server, "GET", "/v1/whoami", token=token)
    path = client.save_login(server, token)
    print(f"logged in to {server} as {who['user']} ({who['role']} in {who['project'] or 'the fleet'}); "
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
    from supercluster.service import usage as usage_mod

    if as_json and as_csv:
        raise UserError("--json and --csv cannot be used together; pick one.")
    if by not in usage_mod.GROUPS:
        raise UserError(f"--by {by!r} is not one of {', '.join(usage_mod.GROUPS)}; pick one.")
    answer = connect(server, None, db).usage(by, _epoch(since), _epoch(until))
    rows, tokens = answer["rows"], answer["tokens"]
    if as_json:
        print(json.dumps({"by": by, "rows": rows, "tokens": tokens}, indent=1, sort_keys=True))
    elif as_csv:
        sys.stdout.write(usage_mod.to_csv(rows, tokens))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"usage by {by}")
        owners = any(r.get("owner") for r in rows)  # clusters made without the service, by their --owner tag
        for col in ("org", "project", "user", *(("owner",) if owners else ()), "gpu type", "GPU-hours", "$/GPU-hour", "cost $"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["org"] or "-", r["project"] or "-", r["user"] or "-", *((r.get("owner") or "-",) if owners else ()),
                          r["gpu_type"], f"{r['gpu_hours']:.3f}",
                          "-" if r["usd_per_gpu_hour"] is None else f"{r['usd_per_gpu_hour']:.2f}",
                          "-" if r["cost_usd"] is None else f"{r['cost_usd']:.2f}")
        Console().print(table)
        if tokens:
            table = Table(title=f"endpoint calls by {by}")
            for col in ("org", "project", "user", "endpoint", "requests", "prompt tokens", "completion tokens"):
                table.add_column(col)
            for r in tokens:
                table.add_row(r["org"] or "-", r["project"] or "-", r["user"] or "-", r["endpoint"] or "-", str(r["requests"]),
                              str(r["prompt_tokens"]), str(r["completion_tokens"]))
            Console().print(table)


endpoint_app = typer.Typer(help="Models a project serves from its clusters, called with its tokens (a server's feature).")


def _endpoints(server: str | None, project: str | None):
    return connect(server, project)  # the local client says endpoints live on a server


def _print_endpoints(endpoints: list[dict], server: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="endpoints")
    for col in ("name", "state", "cluster", "serves", "requests", "prompt tokens", "completion tokens", "OpenAI base URL"):
        table.add_column(col)
    for e in endpoints:
        table.add_row(e["name"], e["state"] + (f" ({e['detail']})" if e["detail"] else ""), e["cluster"], e["run_dir"],
                      str(e["requests"]), str(e["prompt_tokens"]), str(e["completion_tokens"]), server.rstrip("/") + e["base_url"])
    Console(width=200).print(table)


@endpoint_app.command("deploy")
def endpoint_deploy(
    name: str,
    cluster: Annotated[str, typer.Option("--cluster", help="One of the project's clusters, ready.")],
    run_dir: Annotated[Optional[str], typer.Option("--run-dir", help="A run directory in the server's model library.")] = None,
    job: Annotated[Optional[int], typer.Option("--job", min=1, max=MAX_ID, help="Or: serve what this training job of the project wrote.")] = None,
    quantize: Annotated[str, typer.Option("--quantize", help=f"{', '.join(QUANTIZATIONS)} (as serve --quantize).")] = DEFAULT_QUANTIZATION,
    replicas: Annotated[str, typer.Option("--replicas", help="MIN[:MAX] model servers; the service scales between them with load.")] = "1",
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until it answers (or fails).")] = True,
    server: ServerOption = None,
    project: ProjectOption = None,
    as_json: JsonOption = False,
):
    """Serve a model from one of the project's clusters (OpenAI API, with the project's tokens)."""
    from supercluster.errors import UserError

    if (run_dir is None) == (job is None):
        raise UserError("Give exactly one of --run-dir and --job.")
    remote = _endpoints(server, project)
    source = {"run_dir": run_dir} if run_dir is not None else {"job": job}
    low, _, high = replicas.partition(":")
    if not low.isdigit() or not (high.isdigit() or not high):
        raise UserError(f"--replicas {replicas!r} is not MIN or MIN:MAX; write it like 2 or 1:4.")
    endpoint = remote.deploy_endpoint(name, cluster, quantize=quantize, min_replicas=int(low),
                                      max_replicas=int(high) if high else None, **source)
    if wait:
        endpoint = remote.wait_endpoint(name)
    if as_json:
        print(json.dumps(endpoint, indent=1, sort_keys=True))
    else:
        _print_endpoints([endpoint], remote.server)
    if endpoint["state"] == "failed":
        raise typer.Exit(1)


@endpoint_app.command("list")
def endpoint_list(server: ServerOption = None, project: ProjectOption = None, as_json: JsonOption = False):
    """The project's endpoints: state, what they serve, requests and tokens."""
    remote = _endpoints(server, project)
    endpoints = remote.list_endpoints()
    if as_json:
        print(json.dumps(endpoints, indent=1, sort_keys=True))
    else:
        _print_endpoints(endpoints, remote.server)


@endpoint_app.command("delete")
def endpoint_delete(
    name: str,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until its servers have stopped (else: it is stopping).")] = True,
    server: ServerOption = None,
    project: ProjectOption = None,
    as_json: JsonOption = False,
):
    """Stop an endpoint's servers (its calls stay counted in usage)."""
    endpoint = _endpoints(server, project).delete_endpoint(name, wait=wait)
    if as_json:
        print(json.dumps(endpoint, indent=1, sort_keys=True))
    else:
        print(f"endpoint {name} {endpoint['state']} after {endpoint['requests']} requests"
              + (f" ({endpoint['detail']})" if endpoint["detail"] else ""))


def register(app: typer.Typer) -> None:
    app.add_typer(server_app, name="server")
    app.add_typer(endpoint_app, name="endpoint")
    app.command("login")(login)
    app.command("usage")(usage)
