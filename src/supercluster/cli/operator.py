"""`supercluster org | project | user | token | quota | node`: the operator's and project admins'
commands, each a client of the server's /v1 routes (`node` also works on the local fleet database)."""

from __future__ import annotations

import json
import urllib.parse
from typing import Annotated, Optional

import typer

from supercluster.cli.flags import DbOption, JsonOption, ProjectOption, ServerOption
from supercluster.client import server_for

org_app = typer.Typer(help="Organizations: the tenants that hold projects and users (a server's).", no_args_is_help=True)
project_app = typer.Typer(help="Projects: where clusters, jobs, quotas and tokens live (a server's).", no_args_is_help=True)
user_app = typer.Typer(help="Users of an organization (a server's).", no_args_is_help=True)
token_app = typer.Typer(help="API tokens: one user, one project, one role (a server's).", no_args_is_help=True)
quota_app = typer.Typer(help="A project's GPU quota and budget (the operator's, on a server).", no_args_is_help=True)
node_app = typer.Typer(help="Take fleet nodes out of placement and back (the operator's).", no_args_is_help=True)

OrgOption = Annotated[str, typer.Option("--org", help="The organization it belongs to.")]


def _server(server: str | None, what: str) -> str:
    from supercluster.errors import UserError
    from supercluster.service.client import server_url

    url = server_url(server)
    if not url:
        raise UserError(f"{what} live on a server: pass --server URL or set $SUPERCLUSTER_SERVER "
                        "(after `supercluster login --server URL`).")
    return url


def _quote(name) -> str:
    return urllib.parse.quote(str(name), safe="")


def _show(answer: dict, as_json: bool, line: str) -> None:
    print(json.dumps(answer, indent=1, sort_keys=True) if as_json else line)


@org_app.command("create")
def org_create(name: str, server: ServerOption = None, as_json: JsonOption = False):
    """Create an organization (the operator's)."""
    from supercluster.service.client import call

    org = call(_server(server, "Organizations"), "POST", "/v1/orgs", body={"name": name})
    _show(org, as_json, f"organization {org['name']} created")


@project_app.command("create")
def project_create(name: str, org: OrgOption, server: ServerOption = None, as_json: JsonOption = False):
    """Create a project in an organization (the operator's)."""
    from supercluster.service.client import call

    p = call(_server(server, "Projects"), "POST", f"/v1/orgs/{_quote(org)}/projects", body={"name": name})
    _show(p, as_json, f"project {p['name']} created in organization {p['org']}")


@user_app.command("create")
def user_create(name: str, org: OrgOption, server: ServerOption = None, as_json: JsonOption = False):
    """Create a user in an organization (the operator's, or an admin's in its own)."""
    from supercluster.service.client import call

    u = call(_server(server, "Users"), "POST", "/v1/users", body={"name": name, "org": org})
    _show(u, as_json, f"user {u['name']} created in organization {u['org']}")


@token_app.command("create")
def token_create(
    user: Annotated[str, typer.Option("--user", help="Whose token it is.")],
    project: Annotated[str, typer.Option("--project", help="The one project it acts in.")],
    role: Annotated[str, typer.Option("--role", help="viewer, member or admin.")] = "viewer",
    days: Annotated[Optional[float], typer.Option("--days", help="Lifetime in days (default 30, at most 365).")] = None,
    server: ServerOption = None,
    as_json: JsonOption = False,
):
    """Issue a token for a user in a project, and print it (this once: it is stored hashed)."""
    from supercluster.service.client import call

    body = {"user": user, "project": project, "role": role, "days": days}
    t = call(_server(server, "Tokens"), "POST", "/v1/tokens", body={k: v for k, v in body.items() if v is not None})
    # the secret alone on the last line, so that `| tail -n1` hands it to `login`
    _show(t, as_json, f"token {t['id']} for {t['user']} ({t['role']} in {t['project']}; shown once, keep it secret):\n{t['token']}")


@token_app.command("revoke")
def token_revoke(token_id: int, server: ServerOption = None, as_json: JsonOption = False):
    """Revoke a token at once (its id is in `token create`'s answer and in GET /v1/tokens)."""
    from supercluster.service.client import call

    t = call(_server(server, "Tokens"), "DELETE", f"/v1/tokens/{token_id}")
    _show(t, as_json, f"token {t['id']} of {t['user']} revoked")


@quota_app.command("set")
def quota_set(
    gpu_type: Annotated[str, typer.Option("--gpu-type", help="The GPU type it limits (one quota per type).")],
    max_gpus: Annotated[Optional[int], typer.Option("--max-gpus", help="GPUs the project may hold at once (default: no limit).")] = None,
    gpu_hours: Annotated[Optional[float], typer.Option("--gpu-hours", help="Budget of GPU-hours (default: no limit).")] = None,
    max_priority: Annotated[int, typer.Option("--max-priority", help="Highest priority its clusters may ask for.")] = 0,
    server: ServerOption = None,
    project: ProjectOption = None,
    as_json: JsonOption = False,
):
    """Set a project's quota for one GPU type (the operator's); what it leaves out is unlimited."""
    from supercluster.service.client import ProjectClient

    remote = ProjectClient(_server(server, "Quotas"), project)
    q = remote.set_quota(gpu_type, max_gpus=max_gpus, gpu_hours=gpu_hours, max_priority=max_priority)
    row = next((r for r in q["quotas"] if r["gpu_type"].lower() == gpu_type.lower()), None) or q["quotas"][0]
    _show(q, as_json, f"quota of project {q['project']} on {row['gpu_type']}: max_gpus {row['max_gpus'] if row['max_gpus'] is not None else 'unlimited'}, "
                      f"gpu_hours {row['gpu_hours'] if row['gpu_hours'] is not None else 'unlimited'}, max_priority {row['max_priority']}")


@node_app.command("drain")
def node_drain(
    name: str,
    reason: Annotated[str, typer.Option("--reason", help="Why: shown beside the node and to clusters that wait for it.")],
    server: ServerOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
):
    """Take a node out of placement; clusters already on it keep it until they are deleted."""
    from supercluster.errors import UserError

    if not reason.strip():
        raise UserError("--reason is empty; say why the node is drained, e.g. --reason 'fan replaced'.")
    url = server_for(server, db)
    if url:
        from supercluster.service.client import call

        answer = call(url, "POST", f"/v1/fleet/nodes/{_quote(name)}/drain", body={"reason": reason})
    else:
        from supercluster.cluster.fleet import drain_node

        drain_node(name, reason, db=db)
        answer = {"node": name, "state": "drain", "reason": reason}
    _show(answer, as_json, f"node {name} drained ({reason})")


@node_app.command("undrain")
def node_undrain(name: str, server: ServerOption = None, db: DbOption = None, as_json: JsonOption = False):
    """Return a drained or down node to service; queued clusters that now fit start."""
    url = server_for(server, db)
    if url:
        from supercluster.service.client import call

        answer = call(url, "POST", f"/v1/fleet/nodes/{_quote(name)}/undrain")
    else:
        from supercluster.cluster.fleet import resume_node

        answer = {"node": name, "state": "up", "started": resume_node(name, db=db, only_if_out=True)}
    started = answer["started"]
    _show(answer, as_json, f"node {name} back in service" + (f"; started {', '.join(started)}" if started else ""))


def register(app: typer.Typer) -> None:
    for name, sub in (("org", org_app), ("project", project_app), ("user", user_app), ("token", token_app),
                      ("quota", quota_app), ("node", node_app)):
        app.add_typer(sub, name=name)
