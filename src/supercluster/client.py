"""One client path for the `cluster`, `job`, `endpoint` and `usage` commands (as SkyPilot's
CLI → SDK → server): `connect` gives a `Client`, either `LocalClient` (the fleet database on this
machine, through `supercluster.cluster` and the service's books) or `RemoteClient` (a server's
/v1 routes, through `service.client.ProjectClient`). Both answer in the same shapes (the same
keys, None where one side has nothing to tell: a server keeps its paths and the fleet's names to
itself), so every command prints one way whichever it talks to.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator, Protocol

from supercluster.errors import UserError

# How long `endpoint delete` waits for a stopping server: a local one is killed 30 s after SIGTERM
# (backends.local.CANCEL_GRACE_S), a Slurm one after KillWait; past this, one sentence, not a hang.
STOP_WAIT_S = 120.0

# The keys of a cluster and of a job as every client gives them.
CLUSTER_KEYS = ("name", "project", "state", "reason", "gpus", "gpu_type", "nodes", "switches", "leaves", "pods",
                "lower_bound", "max_switches", "queue_position", "reservation", "owner", "priority", "cause",
                "created_at", "placed_at", "jobs")
JOB_KEYS = ("id", "cluster", "state", "config", "overrides", "command", "job_dir", "run_dir", "backend_ref", "restarts",
            "max_restarts", "preemptions", "exit_code", "cause", "detail", "submitted_at", "ended_at")
ACTIVE = ("pending", "running")


def _shaped(d: dict, keys: tuple[str, ...]) -> dict:
    return {k: d.get(k) for k in keys}


def server_for(server: str | None, db: str | None) -> str | None:
    """The server to talk to (--server or $SUPERCLUSTER_SERVER), or None for the local database;
    naming both a server and a database is refused, since only one of them would be used."""
    from supercluster.service.client import server_url

    url = server_url(server)
    if url and db:
        raise UserError("--db and --server (or $SUPERCLUSTER_DB and $SUPERCLUSTER_SERVER) cannot be used together; "
                        "pass --db for the local database or --server for a server.")
    return url


class Client(Protocol):
    """What the commands ask of a fleet, wherever it is. `scope`: whose things it lists, for a
    title ("" for the local fleet's, " of project NAME" for a server's)."""

    scope: str

    def create_cluster(self, name: str, gpus: int, *, gpu_type: str | None = None, max_switches: int | None = None,
                       require_health: bool = False, priority: int = 0, wait: bool = True, owner: str | None = None,
                       health_max_age_s: float | None = None) -> dict: ...
    def list_clusters(self) -> list[dict]: ...
    def show_cluster(self, name: str) -> dict: ...
    def delete_cluster(self, name: str, force: bool = False) -> list[str]: ...
    def submit_job(self, cluster: str, config: str, overrides: list[str], max_restarts: int) -> dict: ...
    def list_jobs(self, cluster: str | None = None) -> list[dict]: ...
    def job_status(self, job_id: int) -> dict: ...
    def wait_job(self, job_id: int) -> dict: ...
    def cancel_job(self, job_id: int) -> dict: ...
    def job_logs(self, job_id: int, follow: bool = False) -> Iterator[str]: ...
    def usage(self, by: str, since: float | None, until: float | None) -> dict: ...
    def deploy_endpoint(self, name: str, cluster: str, **source) -> dict: ...
    def list_endpoints(self) -> list[dict]: ...
    def show_endpoint(self, name: str) -> dict: ...
    def wait_endpoint(self, name: str) -> dict: ...
    def delete_endpoint(self, name: str, wait: bool = True) -> dict: ...


def connect(server: str | None = None, project: str | None = None, db: str | None = None) -> Client:
    """A server's client when one is named (--server or $SUPERCLUSTER_SERVER), else the local database's."""
    url = server_for(server, db)
    return RemoteClient(url, project) if url else LocalClient(db)


class LocalClient:
    """The fleet database on this machine (--db, $SUPERCLUSTER_DB, else $SUPERCLUSTER_HOME/fleet.db)."""

    scope = ""

    def __init__(self, db: str | None = None):
        self.db = db
        self.server = None

    # ---- clusters
    @staticmethod
    def _cluster(c: dict) -> dict:
        return _shaped({**c, "reason": c["detail"]}, CLUSTER_KEYS)  # the fleet calls it detail, the API reason

    def create_cluster(self, name, gpus, *, gpu_type=None, max_switches=None, require_health=False, priority=0, wait=True,
                       owner=None, health_max_age_s=None):
        from supercluster.cluster.clusters import create_cluster
        from supercluster.cluster.state import DEFAULT_HEALTH_MAX_AGE_S

        return self._cluster(create_cluster(self.db, name, gpus, gpu_type=gpu_type, wait=wait, max_switches=max_switches,
                                            require_health=require_health, priority=priority, owner=owner,
                                            health_max_age_s=DEFAULT_HEALTH_MAX_AGE_S if health_max_age_s is None
                                            else health_max_age_s))  # 0 is an age too

    def list_clusters(self):
        from supercluster.cluster.clusters import list_clusters

        return [self._cluster(c) for c in list_clusters(self.db)]

    def show_cluster(self, name):
        from supercluster.cluster.clusters import show_cluster

        return self._cluster(show_cluster(self.db, name))

    def delete_cluster(self, name, force=False):
        from supercluster.cluster.clusters import delete_cluster

        return delete_cluster(self.db, name, force=force)

    # ---- jobs
    def submit_job(self, cluster, config, overrides, max_restarts):
        from supercluster.cluster.jobs import submit_job

        return _shaped(submit_job(self.db, cluster, config, overrides, max_restarts=max_restarts), JOB_KEYS)

    def list_jobs(self, cluster=None):
        from supercluster.cluster.jobs import list_jobs

        return [_shaped(j, JOB_KEYS) for j in list_jobs(self.db, cluster)]

    def job_status(self, job_id):
        from supercluster.cluster.jobs import job_status

        return _shaped(job_status(self.db, job_id), JOB_KEYS)

    def wait_job(self, job_id):
        from supercluster.cluster.jobs import wait_job

        return _shaped(wait_job(self.db, job_id, timeout_s=float("inf")), JOB_KEYS)

    def cancel_job(self, job_id):
        from supercluster.cluster.jobs import cancel_job

        return _shaped(cancel_job(self.db, job_id), JOB_KEYS)

    def job_logs(self, job_id, follow=False):
        """The job's log as it grows, in pieces; with `follow`, until the job ends."""
        from supercluster.cluster import jobs

        path, offset = jobs.log_path(self.db, job_id), 0

        def rest() -> str:
            nonlocal offset
            if not path.exists():
                return ""
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            return chunk.decode(errors="replace")

        while True:
            if chunk := rest():
                yield chunk
            if not follow or jobs.job_status(self.db, job_id)["state"] not in ACTIVE:
                if follow and (chunk := rest()):  # what was written between the last read and the end
                    yield chunk
                return
            time.sleep(1.0)

    # ---- usage
    def usage(self, by, since, until):
        """The fleet's GPU-hours (its own clusters by --owner tag, and the service's projects on it) and endpoint tokens."""
        from supercluster.service import usage as usage_mod
        from supercluster.service.endpoints import token_report
        from supercluster.service.store import Store

        store = Store(self.db)
        try:
            with store.session() as s:
                rows = usage_mod.report(s, by=by, since=since, until=until, fleet_clusters=True)
                tokens = token_report(s, by=by, since=since, until=until)
        finally:
            store.dispose()
        return {"by": by, "rows": rows, "tokens": tokens}

    # ---- endpoints: a server's feature
    def _no_endpoints(self, *_, **__):
        raise UserError("Endpoints live on a server: pass --server URL or set $SUPERCLUSTER_SERVER "
                        "(on this machine alone, `supercluster serve RUN_DIR` serves a model).")

    deploy_endpoint = list_endpoints = show_endpoint = wait_endpoint = delete_endpoint = _no_endpoints


class RemoteClient:
    """One project's resources on a server (the project named, else the stored token's)."""

    def __init__(self, server: str, project: str | None = None):
        from supercluster.service.client import ProjectClient

        self.http = ProjectClient(server, project)
        self.server = self.http.server

    @property
    def scope(self) -> str:
        return f" of project {self.http.project}"

    @property
    def project(self) -> str:
        return self.http.project

    # ---- clusters
    @staticmethod
    def _cluster(c: dict) -> dict:
        # The server tells a tenant its state and why (`reason`); the fleet's names, paths and
        # lower bound stay on its side.
        switches = sorted({n["leaf"] for n in c.get("nodes", [])})
        return _shaped({**c, "switches": switches}, CLUSTER_KEYS)

    def create_cluster(self, name, gpus, *, gpu_type=None, max_switches=None, require_health=False, priority=0, wait=True,
                       owner=None, health_max_age_s=None):
        for flag, given in (("--no-wait", not wait), ("--owner", owner), ("--health-max-age", health_max_age_s is not None)):
            if given:
                raise UserError(f"{flag} works on the local database only; leave it out with --server.")
        return self._cluster(self.http.create_cluster(name, gpus, gpu_type=gpu_type, max_switches=max_switches,
                                                      require_health=require_health, priority=priority))

    def list_clusters(self):
        return [self._cluster(c) for c in self.http.list_clusters()]

    def show_cluster(self, name):
        return self._cluster(self.http.show_cluster(name))

    def delete_cluster(self, name, force=False):
        self.http.delete_cluster(name, force=force)
        return []  # the server starts what now fits without naming it: another project's may be among them

    # ---- jobs
    def submit_job(self, cluster, config, overrides, max_restarts):
        """The file's content is sent, once it loads as a training config here (a typo fails
        before anything is sent); paths in it are read on the server's machines."""
        return _shaped(self.http.submit_job(cluster, _config_table(config, overrides), overrides, max_restarts), JOB_KEYS)

    def list_jobs(self, cluster=None):
        return [_shaped(j, JOB_KEYS) for j in self.http.list_jobs() if cluster is None or j["cluster"] == cluster]

    def job_status(self, job_id):
        return _shaped(self.http.job_status(job_id), JOB_KEYS)

    def wait_job(self, job_id):
        return _shaped(self.http.wait_job(job_id), JOB_KEYS)

    def cancel_job(self, job_id):
        return _shaped(self.http.cancel_job(job_id), JOB_KEYS)

    def job_logs(self, job_id, follow=False):
        for line in self.http.job_logs(job_id, follow=follow):
            yield line + "\n"

    # ---- usage
    def usage(self, by, since, until):
        from supercluster.service.client import call

        answer = call(self.server, "GET", "/v1/usage", query={"by": by, "since": since, "until": until})
        return {"by": by, "rows": answer["rows"], "tokens": answer.get("tokens", [])}

    # ---- endpoints
    def deploy_endpoint(self, name, cluster, **source):
        return self.http.deploy_endpoint(name, cluster, **source)

    def list_endpoints(self):
        return self.http.list_endpoints()

    def show_endpoint(self, name):
        return self.http.show_endpoint(name)

    def wait_endpoint(self, name):
        return self.http.wait_endpoint(name)

    def delete_endpoint(self, name, wait=True):
        """Asks the server to stop it (it answers at once, `stopping`); with `wait`, polls until it has."""
        endpoint = self.http.delete_endpoint(name)
        if wait and endpoint["state"] == "stopping":
            endpoint = self.http.wait_endpoint(name, poll_s=0.5, leaving="stopping", timeout_s=STOP_WAIT_S)
        return endpoint


def _config_table(path: str, overrides: list[str]) -> dict:
    """The TOML's sections as written, once they load as a training config (a typo fails here, not on the fleet)."""
    import tomllib

    from supercluster.train.config import load_config

    load_config(path, overrides)
    return tomllib.loads(Path(path).read_text())
