"""An endpoint's replicas: model servers started through the fleet, followed, replaced and scaled.

Each replica is `supercluster serve` as a serving job of the fleet on the endpoint's cluster,
started by the cluster's backend. On a local fleet it listens on loopback; on Slurm it binds all
of its node's addresses and the service reaches it at the node's address (`NodeAddr`), on a port
the service chose (a busy one there fails the replica, and the scaler starts another).

The scaler's pass (`scale`, every `SUPERCLUSTER_SCALE_EVERY_S` seconds in the server) reads each
ready replica's own `/metrics` (requests running and waiting, time to first token): the servers
are the one place that knows the load of every worker of the service. Per endpoint, it
- replaces a replica whose server ended (the others keep answering meanwhile);
- scales out by one when requests per ready replica exceed `SUPERCLUSTER_SCALE_OUT_QUEUE` (default 4)
  or the mean TTFT since the last pass exceeds `SUPERCLUSTER_SCALE_OUT_TTFT_S` (default 2.0), with no
  replica still starting and at most `max_replicas`;
- scales in by one after `SUPERCLUSTER_SCALE_IN_IDLE_S` seconds (default 60) in which one replica
  fewer would have stayed under half the scale-out queue, never below `min_replicas`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from supercluster.cluster import jobs as fleet_jobs
from supercluster.cluster.backends.registry import backend_for
from supercluster.cluster.state import JOB_ACTIVE, Cluster, Job, Node
from supercluster.errors import UserError
from supercluster.paths import home
from supercluster.service.models import Endpoint, EndpointReplica, ServiceCluster
from supercluster.service.store import Store

LIVE = ("starting", "ready")
log = logging.getLogger("supercluster.service")


@dataclass(frozen=True)
class Thresholds:
    every_s: float = 5.0
    out_queue: float = 4.0
    out_ttft_s: float = 2.0
    in_idle_s: float = 60.0

    @classmethod
    def from_env(cls) -> Thresholds:
        env = os.environ.get
        return cls(float(env("SUPERCLUSTER_SCALE_EVERY_S", cls.every_s)), float(env("SUPERCLUSTER_SCALE_OUT_QUEUE", cls.out_queue)),
                   float(env("SUPERCLUSTER_SCALE_OUT_TTFT_S", cls.out_ttft_s)),
                   float(env("SUPERCLUSTER_SCALE_IN_IDLE_S", cls.in_idle_s)))


# ---- the servers' key -------------------------------------------------------------------------

def key_file(secret: str) -> Path:
    """Where the servers read their key: a file of the service's, not their command line, which `ps`
    shows every user of the node and the fleet's books keep (and print) with the job."""
    return home() / "service" / "endpoint-keys" / f"{hashlib.sha256(secret.encode()).hexdigest()[:32]}.key"


def write_key(secret: str) -> Path:
    path = key_file(secret)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return path


# ---- starting and stopping ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(e: Endpoint, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "supercluster.cli.main", "serve", e.run_dir, "--host", host, "--port", str(port),
            "--api-key-file", str(key_file(e.secret)), "--max-running", str(e.max_running), "--quantize", e.quantize,
            "--served-model-name", e.name]


def bind_host(backend: str) -> str:
    """Where a replica listens: loopback on the service's own machine, every address of a node elsewhere."""
    return "127.0.0.1" if backend == "local" else "0.0.0.0"


def start(store: Store, endpoint: Endpoint, fleet_cluster: str, backend: str, index: int, record=None) -> None:
    """Starts replica `index` of `endpoint` as a serving job; its row is written with the job, or
    neither is. `record(s, job)`: more to write in that transaction first (it may refuse by raising)."""
    port = free_port()
    command = server_command(endpoint, bind_host(backend), port)

    def write(s, job) -> None:
        if record is not None:
            record(s, job)
        elif s.scalar(sa.select(Endpoint.state).where(Endpoint.id == endpoint.id)) not in LIVE:
            raise UserError(f"Endpoint {endpoint.name!r} was stopped; it gets no more replicas.")
        s.add(EndpointReplica(endpoint_id=endpoint.id, index=index, job_id=job.id, url=None, port=port, state="starting",
                              started_at=time.time()))

    fleet_jobs.submit_job(store.fleet, fleet_cluster, endpoint.run_dir, command=command, max_restarts=0, record=write)


def stop(store: Store, replica: EndpointReplica, state: str = "stopped") -> None:
    if replica.job_id is not None:
        try:
            fleet_jobs.cancel_job(store.fleet, replica.job_id)
        except UserError:
            pass  # it had ended by itself
    with store.session() as s:
        row = s.get(EndpointReplica, replica.id)
        if row.state in LIVE:
            row.state, row.ended_at = state, time.time()


# ---- following them -----------------------------------------------------------------------------

def _address(store: Store, job: Job) -> str | None:
    """The address of the node that runs `job`: the backend's say (Slurm picks a node of the
    reservation), else the cluster's first node; None while it has none."""
    with store.reading() as s:
        fleet = store.fleet.fleet(s)
        backend = backend_for(fleet.backend, fleet.settings)
        nodes = backend.poll(job.backend_ref, job.job_dir).nodes if job.backend_ref else ()
        if not nodes:
            cluster = s.scalar(sa.select(Cluster).where(Cluster.name == job.cluster_name))
            nodes = tuple(cluster.node_names[:1]) if cluster is not None else ()
        node = s.get(Node, nodes[0]) if nodes else None
        return (node.address or node.name) if node is not None else None


def refresh(store: Store, endpoints: list[Endpoint]) -> None:
    """Replicas become ready once their server answers, failed once their job ended; an endpoint is
    ready while one of its replicas is, and failed when its first replicas failed before any was."""
    ids = [e.id for e in endpoints if e.state in LIVE]
    if not ids:
        return
    fleet_jobs.refresh(store.fleet)
    with store.reading() as s:
        rows = list(s.scalars(sa.select(EndpointReplica).where(EndpointReplica.endpoint_id.in_(ids),
                                                               EndpointReplica.state.in_(LIVE))))
        jobs = {j.id: j for j in s.scalars(sa.select(Job).where(Job.id.in_([r.job_id for r in rows if r.job_id])))}
    changes = {}
    for r in rows:
        job = jobs.get(r.job_id)
        state, detail, url = r.state, r.detail, r.url
        if job is None or job.state not in JOB_ACTIVE:
            what = job.state if job is not None else "is gone"
            state, detail = "failed", f"its serving job {what}" + (f" ({job.detail})" if job is not None and job.detail else "")
        elif job.state == "running":
            if url is None and (address := _address(store, job)):
                url = f"http://{address}:{r.port}"
            if url is not None and state == "starting":
                try:
                    if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                        state, detail = "ready", None
                except httpx.HTTPError:
                    pass  # still loading the model
        if (state, detail, url) != (r.state, r.detail, r.url):
            changes[r.id] = (state, detail, url)
    with store.session() as s:
        for rid, (state, detail, url) in changes.items():
            row = s.get(EndpointReplica, rid)
            row.state, row.detail, row.url = state, detail, url
            if state not in LIVE:
                row.ended_at = time.time()
        for e in endpoints:
            if e.id not in ids:
                continue
            row = s.get(Endpoint, e.id)
            replicas = list(s.scalars(sa.select(EndpointReplica).where(EndpointReplica.endpoint_id == e.id)))
            if row.state in LIVE and any(r.state == "ready" for r in replicas):  # not one deleted meanwhile
                row.state, row.detail = "ready", None
            elif row.state == "starting" and replicas and all(r.state not in LIVE for r in replicas):
                failed = [r for r in replicas if r.state == "failed"]
                row.state = "failed"
                row.detail = failed[-1].detail if failed else "its replicas stopped"
            e.state, e.detail = row.state, row.detail


# ---- the scaler ---------------------------------------------------------------------------------

@dataclass
class Load:
    outstanding: float  # running + waiting, summed over the ready replicas
    ready: int
    ttft_s: float | None  # mean time to first token since the last pass


def server_metrics(url: str) -> tuple[float, float, float]:
    """(requests running + waiting, TTFT seconds summed, TTFT count) from one server's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5.0).text
    outstanding = ttft_sum = ttft_count = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("supercluster_num_requests_running", "supercluster_num_requests_waiting"):
                outstanding += sample.value
            elif sample.name == "supercluster_time_to_first_token_seconds_sum":
                ttft_sum = sample.value
            elif sample.name == "supercluster_time_to_first_token_seconds_count":
                ttft_count = sample.value
    return outstanding, ttft_sum, ttft_count


class Scaler:
    """The periodic pass; keeps what it saw last (TTFT totals, when load was last high) between passes."""

    def __init__(self, store: Store, thresholds: Thresholds | None = None):
        self.store = store
        self.t = thresholds or Thresholds.from_env()
        self.ttft_seen: dict[int, tuple[float, float]] = {}  # replica id -> (sum, count) at the last pass
        self.busy_at: dict[int, float] = {}  # endpoint id -> when one replica fewer last would not have done

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.t.every_s):
            try:
                self.scale()
            except Exception:  # a failed pass must not end the loop; the next one tries again
                log.exception("endpoint scaling pass failed")

    def load(self, replicas: list[EndpointReplica]) -> Load:
        outstanding, ready, ttft_sum, ttft_count = 0.0, 0, 0.0, 0.0
        for r in replicas:
            if r.state != "ready":
                continue
            try:
                queue, total, count = server_metrics(r.url)
            except (httpx.HTTPError, ValueError) as err:
                log.info("replica %s at %s: no metrics (%r)", r.index, r.url, err)
                continue  # not answering: its job's end (or not) says what became of it
            ready += 1
            outstanding += queue
            last_sum, last_count = self.ttft_seen.get(r.id, (0.0, 0.0))
            if count > last_count:
                ttft_sum, ttft_count = ttft_sum + total - last_sum, ttft_count + count - last_count
            self.ttft_seen[r.id] = (total, count)
        return Load(outstanding, ready, ttft_sum / ttft_count if ttft_count else None)

    def scale(self) -> None:
        store = self.store
        with store.reading() as s:
            endpoints = list(s.scalars(sa.select(Endpoint).where(Endpoint.state.in_(LIVE))))
        refresh(store, endpoints)
        for e in endpoints:
            if e.state in LIVE:
                self.scale_one(e)

    def scale_one(self, e: Endpoint) -> None:
        store, now = self.store, time.time()
        with store.reading() as s:
            replicas = list(s.scalars(sa.select(EndpointReplica).where(EndpointReplica.endpoint_id == e.id,
                                                                       EndpointReplica.state.in_(LIVE))
                                      .order_by(EndpointReplica.index)))
            fleet_cluster = s.scalar(sa.select(ServiceCluster.fleet_name).where(ServiceCluster.project_id == e.project_id,
                                                                                ServiceCluster.name == e.cluster))
            backend = store.fleet.fleet(s).backend
        wanted = e.replicas
        load = self.load(replicas)
        log.debug("endpoint %s: %d replicas, load %s", e.name, len(replicas), load)
        per_replica = load.outstanding / load.ready if load.ready else 0.0
        starting = any(r.state == "starting" for r in replicas)
        cooled = e.scaled_at is None or now - e.scaled_at >= self.t.every_s
        if load.ready and not starting and cooled and wanted < e.max_replicas and (
                per_replica > self.t.out_queue or (load.ttft_s is not None and load.ttft_s > self.t.out_ttft_s)):
            wanted += 1
            log.info("endpoint %s: scaling out to %d (%.1f requests per replica, TTFT %s)", e.name, wanted, per_replica, load.ttft_s)
        if load.outstanding > (len(replicas) - 1) * self.t.out_queue / 2 or e.id not in self.busy_at:
            self.busy_at[e.id] = now
        if (wanted == e.replicas > e.min_replicas and len(replicas) == wanted and not starting
                and now - max(self.busy_at[e.id], e.scaled_at or 0) >= self.t.in_idle_s):
            wanted -= 1
            log.info("endpoint %s: scaling in to %d (idle)", e.name, wanted)
            stop(store, replicas[-1])  # the highest index: the lower ones keep their prefixes
            replicas = replicas[:-1]
        if wanted != e.replicas:
            with store.session() as s:
                row = s.get(Endpoint, e.id)
                row.replicas, row.scaled_at = wanted, now
            e.replicas, e.scaled_at = wanted, now
        # Replace the dead and start the new: the lowest indexes free among the live ones.
        used = {r.index for r in replicas}
        free = (i for i in range(e.max_replicas) if i not in used)
        for _ in range(wanted - len(replicas)):
            try:
                start(store, e, fleet_cluster, backend, next(free))
            except UserError as err:  # the cluster went away or is held: the next pass tries again
                log.warning("endpoint %s: could not start a replica (%s)", e.name, err)
                break
