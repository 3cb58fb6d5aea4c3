"""`supercluster fleet | cluster | job`: `fleet` over `supercluster.cluster`; `cluster` and `job`
through one `supercluster.client.Client`, the local database's or, with --server, a server's."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer

from supercluster.cli.flags import DbOption, JsonOption, ProjectOption, ServerOption, SetOption, real
from supercluster.client import connect
from supercluster.limits import MAX_GPUS, MAX_ID, MAX_LOCAL_GPUS, MAX_PRIORITY, MAX_RESTARTS, MAX_SWITCHES

fleet_app = typer.Typer(help="The fleet: nodes, switches, pods.", no_args_is_help=True)
cluster_app = typer.Typer(help="Clusters: gang allocations of GPUs on the fleet.", no_args_is_help=True)
job_app = typer.Typer(help="Jobs: training runs on a cluster.", no_args_is_help=True)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=1, sort_keys=True))


def _table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*("-" if v is None else str(v) for v in row))
    Console().print(table)


JobId = Annotated[int, typer.Argument(min=1, max=MAX_ID, help="The job's id (as `job list` shows).")]


def _when(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


# ---- fleet -------------------------------------------------------------------------------------


@fleet_app.command("init")
def fleet_init(
    backend: Annotated[str, typer.Option("--backend", help="local, slurm or sim.")] = "local",
    spec: Annotated[Optional[Path], typer.Option("--spec", help="sim: TOML fleet spec (default 1,280 x 8 H100).")] = None,
    gpus: Annotated[Optional[int], typer.Option("--gpus", min=1, max=MAX_LOCAL_GPUS, help="local: GPU slots on this machine (default: devices, or CPU cores).")] = None,
    gpu_type: Annotated[Optional[str], typer.Option("--gpu-type", help="slurm: type of GPUs whose gres names none (default: local).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing fleet that holds no clusters.")] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
):
    """Import the fleet's nodes from a backend."""
    from supercluster.cluster.fleet import init_fleet

    options = {k: v for k, v in {"gpus": gpus, "gpu_type": gpu_type}.items() if v}
    info = init_fleet(db, backend, spec=spec, force=force, **options)
    info.pop("node_list")
    if as_json:
        _print_json(info)
    else:
        print(f"fleet on {info['backend']}: {_n(info['nodes'], 'node')}, {info['gpus']} GPUs ({', '.join(info['gpu_types'])}), "
              f"{_n(len(info['leaves']), 'leaf switch', 'leaf switches')} in {_n(info['pods'], 'pod')}")


@fleet_app.command("show")
def fleet_show(
    nodes: Annotated[bool, typer.Option("--nodes", help="One row per node instead of per leaf switch.")] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
):
    """Nodes by pod and leaf switch, with their states."""
    from supercluster.cluster.fleet import summary
    from supercluster.cluster.jobs import refresh

    refresh(db)
    info = summary(db)
    if as_json:
        _print_json(info)
    elif nodes:
        _table(f"{info['backend']} fleet", ["node", "gpu type", "gpus", "used", "pod", "leaf", "status", "health", "clusters"],
               [[n["name"], n["gpu_type"], n["gpus"], n["used_gpus"], n["pod"], n["leaf"], n["status"],
                 n["last_health_status"] or "unchecked", ",".join(n["clusters"])] for n in info["node_list"]])
    else:
        _table(f"{info['backend']} fleet: {info['nodes']} nodes, {info['free_gpus']}/{info['gpus']} GPUs free",
               ["pod", "leaf", "nodes", "gpus", "free gpus", "states"],
               [[r["pod"], r["leaf"], r["nodes"], r["gpus"], r["free_gpus"], " ".join(f"{k}={v}" for k, v in r["states"].items())]
                for r in info["leaves"]])


@fleet_app.command("watch")
def fleet_watch(
    interval: Annotated[float, typer.Option("--interval", callback=real(0, low_open=True), help="Seconds between passes.")] = 5.0,
    db: DbOption = None,
):
    """Keep node and job states current and recover requeued jobs (run it beside a Slurm fleet)."""
    from supercluster.cluster.jobs import refresh

    while True:  # every job command does one such pass; this keeps doing them when nobody asks
        refresh(db)
        time.sleep(interval)


# ---- cluster -----------------------------------------------------------------------------------


def _n(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def _print_cluster(c: dict) -> None:
    where = (f"{_n(len(c['nodes']), 'node')} on {_n(c['leaves'] or 0, 'leaf switch', 'leaf switches')} in "
             f"{_n(c['pods'] or 0, 'pod')}" + (f" (lower bound {c['lower_bound']})" if c["lower_bound"] is not None else ""))
    state = c["state"] if c["state"] != "queued" else f"queued (position {c['queue_position']})"
    print(f"cluster {c['name']}: {c['gpus']} x {c['gpu_type']}, {state}" + (f", {where}" if c["nodes"] else ""))
    if c["nodes"] and c["switches"]:
        switches = c["switches"] if len(c["switches"]) <= 8 else [*c["switches"][:4], "...", *c["switches"][-2:]]
        print(f"  switches: {', '.join(switches)}")
    if c["nodes"]:
        names = [n["name"] for n in c["nodes"]]
        shown = names if len(names) <= 8 else [*names[:4], "...", *names[-2:]]
        print(f"  nodes:    {', '.join(shown)}")
    if c["reservation"]:
        print(f"  reservation: {c['reservation']}")
    if c["priority"] or c["owner"]:
        print(f"  priority {c['priority']}" + (f", owner {c['owner']}" if c["owner"] else ""))
    if c["reason"]:
        print(f"  {c['reason']}")


@cluster_app.command("create")
def cluster_create(
    name: str,
    gpus: Annotated[int, typer.Option("--gpus", min=1, max=MAX_GPUS, help="GPUs to allocate: a multiple of the node's GPU count, or less than one node.")],
    gpu_type: Annotated[Optional[str], typer.Option("--gpu-type", help="GPU type from the catalog (default: the fleet's only type).")] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Fail instead of queueing when the request does not fit now.")] = False,
    max_switches: Annotated[Optional[int], typer.Option("--max-switches", min=1, max=MAX_SWITCHES, help="Use at most this many leaf switches.")] = None,
    require_health: Annotated[bool, typer.Option("--require-health", help="Also refuse nodes that were never health-checked.")] = False,
    health_max_age: Annotated[Optional[float], typer.Option("--health-max-age", callback=real(0), help="Seconds a passed health check stays valid (default 86400).")] = None,
    priority: Annotated[int, typer.Option("--priority", min=0, max=MAX_PRIORITY, help="When it does not fit, preempt clusters of lower priority.")] = 0,
    owner: Annotated[Optional[str], typer.Option("--owner", help="A tag (team, project) that usage is grouped by.")] = None,
    server: ServerOption = None,
    project: ProjectOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
):
    """Allocate a gang of GPUs, placed on the fewest leaf switches."""
    c = connect(server, project, db).create_cluster(name, gpus, gpu_type=gpu_type, wait=not no_wait, max_switches=max_switches,
                                                    require_health=require_health, health_max_age_s=health_max_age,
                                                    priority=priority, owner=owner)
    _print_json(c) if as_json else _print_cluster(c)


@cluster_app.command("list")
def cluster_list(server: ServerOption = None, project: ProjectOption = None, db: DbOption = None, as_json: JsonOption = False):
    """All clusters, placed and queued (with --server: the project's, in the server's words)."""
    client = connect(server, project, db)
    clusters = client.list_clusters()
    if as_json:
        _print_json(clusters)
        return
    _table(f"clusters{client.scope}", ["name", "state", "gpus", "gpu type", "nodes", "leaf switches", "lower bound", "jobs", "reason"],
           [[c["name"], c["state"], c["gpus"], c["gpu_type"], len(c["nodes"]), c["leaves"], c["lower_bound"], len(c["jobs"]),
             c["reason"]] for c in clusters])


@cluster_app.command("show")
def cluster_show(name: str, server: ServerOption = None, project: ProjectOption = None, db: DbOption = None,
                 as_json: JsonOption = False):
    """One cluster: its nodes, switches used and the lower bound for its size."""
    c = connect(server, project, db).show_cluster(name)
    _print_json(c) if as_json else _print_cluster(c)


@cluster_app.command("delete")
def cluster_delete(
    name: str,
    force: Annotated[bool, typer.Option("--force", help="Cancel the cluster's running jobs.")] = False,
    server: ServerOption = None,
    project: ProjectOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
):
    """Release a cluster's nodes (queued clusters that now fit start)."""
    started = connect(server, project, db).delete_cluster(name, force=force)
    if as_json:
        _print_json({"deleted": name, "started": started})
    else:
        print(f"deleted cluster {name}" + (f"; started {', '.join(started)}" if started else ""))


# ---- job ---------------------------------------------------------------------------------------


def _print_job(j: dict) -> None:
    print(f"job {j['id']} on {j['cluster']}: {j['state']}, restarts {j['restarts']}/{j['max_restarts']}"
          + (f", preempted {j['preemptions']}x" if j["preemptions"] else "")
          + (f", exit code {j['exit_code']}" if j["exit_code"] is not None else "")
          + (f" ({j['detail']})" if j["detail"] else ""))
    if j["run_dir"]:  # the server keeps its paths to itself
        print(f"  run dir: {j['run_dir']}")


@job_app.command("submit")
def job_submit(
    config: str,
    cluster: Annotated[str, typer.Option("--cluster", help="Cluster to run on.")],
    overrides: SetOption = None,
    max_restarts: Annotated[int, typer.Option("--max-restarts", min=0, max=MAX_RESTARTS, help="Restarts after a failure before giving up.")] = 3,
    server: ServerOption = None,
    project: ProjectOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
):
    """Run a training config on a cluster (one torchrun per node). With --server the file's content
    is sent; paths in it (data.path) are read on the server's machines."""
    j = connect(server, project, db).submit_job(cluster, config, overrides or [], max_restarts)
    _print_json(j) if as_json else _print_job(j)


@job_app.command("list")
def job_list(
    cluster: Annotated[Optional[str], typer.Option("--cluster", help="Only this cluster's jobs.")] = None,
    server: ServerOption = None,
    project: ProjectOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
):
    """All jobs with their states (with --server: the project's)."""
    client = connect(server, project, db)
    jobs = client.list_jobs(cluster)
    if as_json:
        _print_json(jobs)
        return
    _table(f"jobs{client.scope}", ["id", "cluster", "state", "restarts", "exit", "submitted", "detail"],
           [[j["id"], j["cluster"], j["state"], j["restarts"], j["exit_code"], _when(j["submitted_at"]), j["detail"]] for j in jobs])


@job_app.command("status")
def job_status(
    job_id: JobId,
    wait: Annotated[bool, typer.Option("--wait", help="Block until the job ends.")] = False,
    server: ServerOption = None,
    project: ProjectOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
):
    """One job's state (with --wait: its final state; exit code 1 unless it completed)."""
    client = connect(server, project, db)
    j = client.wait_job(job_id) if wait else client.job_status(job_id)
    _print_json(j) if as_json else _print_job(j)
    if wait and j["state"] != "completed":
        raise typer.Exit(1)


@job_app.command("logs")
def job_logs(
    job_id: JobId,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
    server: ServerOption = None,
    project: ProjectOption = None,
    db: DbOption = None,
):
    """Print a job's output."""
    for text in connect(server, project, db).job_logs(job_id, follow=follow):
        sys.stdout.write(text)
        sys.stdout.flush()


@job_app.command("cancel")
def job_cancel(job_id: JobId, server: ServerOption = None, project: ProjectOption = None, db: DbOption = None,
               as_json: JsonOption = False):
    """Stop a job."""
    j = connect(server, project, db).cancel_job(job_id)
    _print_json(j) if as_json else _print_job(j)


def register(app: typer.Typer) -> None:
    app.add_typer(fleet_app, name="fleet")
    app.add_typer(cluster_app, name="cluster")
    app.add_typer(job_app, name="job")
