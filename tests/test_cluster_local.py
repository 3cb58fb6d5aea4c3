"""The local backend runs the real trainer as a job: submit, follow, refuse delete while running, cancel."""

import json
import time
from pathlib import Path

import pytest

from supercluster.cluster import clusters, fleet, jobs
from supercluster.cluster.state import Database
from supercluster.errors import UserError


@pytest.fixture
def local_db(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    info = fleet.init_fleet(db, "local", gpus=2)
    assert info["nodes"] == 1 and info["gpus"] == 2
    clusters.create_cluster(db, "here", 2, wait=False)
    return db


@pytest.mark.slow
def test_local_job_trains_to_a_checkpoint_and_blocks_delete(local_db, tiny_job, tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text("[model]\npreset = 'tiny'\n")
    job = jobs.submit_job(local_db, "here", str(config), tiny_job(6), max_restarts=0)
    assert job["state"] == "pending"
    with pytest.raises(UserError, match="still runs job"):
        clusters.delete_cluster(local_db, "here")
    final = jobs.wait_job(local_db, job["id"], timeout_s=300, poll_s=1)
    log = Path(jobs.log_path(local_db, job["id"])).read_text()
    assert final["state"] == "completed" and final["exit_code"] == 0, log[-3000:]
    run = Path(final["run_dir"])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps[-1] == 6
    assert (run / "checkpoints" / "step_00000006").is_dir()
    clusters.delete_cluster(local_db, "here")  # no running job: allowed now


def test_cancel_and_forced_delete_stop_the_processes(local_db, tiny_job, tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text("")
    job = jobs.submit_job(local_db, "here", str(config), tiny_job(10_000), max_restarts=0)
    pid = int(job["backend_ref"].split(":")[0])
    assert jobs.job_status(local_db, job["id"])["state"] == "running"
    clusters.delete_cluster(local_db, "here", force=True)
    assert jobs.job_status(local_db, job["id"])["state"] == "cancelled"
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
        try:  # reap our own child (the runner) so that it does not linger as a zombie
            import os

            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(UserError, match="already ended"):
        jobs.cancel_job(local_db, job["id"])


def test_run_on_runs_a_command_on_the_local_node(local_db):
    import sys

    backend = fleet.open_backend(local_db)
    (node,) = fleet.nodes(local_db)
    out = backend.run_on(node["name"], [sys.executable, "-c", "import socket; print(socket.gethostname())"], timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == node["name"]
    assert backend.launch_on([node["name"]], ["true"], timeout=60) is None  # one node: no multi-node launch


def test_a_finished_jobs_runner_leaves_no_zombie_and_its_pid_is_not_mistaken(local_db, tmp_path):
    """A server submits jobs for days: each runner is reaped when it ends, and the ref carries
    the runner's start time, so a pid the kernel hands to another process is not the job."""
    import os
    import sys
    import time
    from pathlib import Path

    from supercluster.cluster.backends.local import _alive

    config = tmp_path / "serve.toml"
    config.write_text("")
    job = jobs.submit_job(local_db, "here", str(config), command=[sys.executable, "-c", "pass"], max_restarts=0)
    assert jobs.wait_job(local_db, job["id"], timeout_s=60, poll_s=0.2)["state"] == "completed"
    pid, started = jobs.job_status(local_db, job["id"])["backend_ref"].split(":")

    def zombies():
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == os.getpid():
                found.append(stat.parent.name)
        return found

    deadline = time.monotonic() + 10
    while pid in zombies() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pid not in zombies()
    assert not _alive(f"{pid}:{started}")
    assert _alive(f"{os.getpid()}:{Path(f'/proc/{os.getpid()}/stat').read_text().rsplit(')', 1)[1].split()[19]}")
    assert not _alive(f"{os.getpid()}:1")  # this pid, but started at another time: another process


def test_preemption_returns_at_once_and_a_restart_waits_for_the_stopped_run(tmp_path):
    """Preempting a local job signals it and leaves the waiting to a detached stopper (it runs in
    the fleet's transaction, often for a request); the job started again in the same job dir waits
    until the stopped run is gone (two trainers never share a run dir), and its exit code is its own."""
    import sys

    from supercluster.cluster.backends.base import JobSpec
    from supercluster.cluster.backends.local import LocalBackend, _group_alive, _pid

    job_dir = tmp_path / "job"
    job_dir.mkdir()
    started = job_dir / "started"
    # ignores SIGTERM (as a trainer deep in a checkpoint) and logs each start
    stubborn = [sys.executable, "-c", "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                f"p = pathlib.Path({str(started)!r}); p.write_text(p.read_text() + 'x' if p.exists() else 'x'); "
                "time.sleep(0 if sys.argv[1:] else 600)"]
    backend = LocalBackend()
    spec = JobSpec(job_id=1, job_dir=str(job_dir), config="", overrides=(), nodes=("here",), gpus_per_node=1,
                   max_restarts=0, command=tuple(stubborn))
    first = backend.submit(spec)
    while not started.exists():
        time.sleep(0.05)
    backend.preempt(first, str(job_dir), grace_s=3.0)
    assert _group_alive(_pid(first))  # returned while the stubborn run still lives: nobody waited for it here
    assert (job_dir / "stopping").read_text() == first

    again = backend.submit(JobSpec(**{**spec.__dict__, "command": (*stubborn, "quick")}))
    assert backend.poll(again, str(job_dir)).state == "running"
    time.sleep(1.0)
    assert started.read_text() == "x"  # the restart has not begun while the stopped run lives
    deadline = time.monotonic() + 60
    while (status := backend.poll(again, str(job_dir))).state == "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert (status.state, status.exit_code) == ("completed", 0) and started.read_text() == "xx"
    assert not _group_alive(_pid(first)) and not (job_dir / "stopping").exists()
    assert (job_dir / "exit_code").read_text() == f"0 {again}"  # the code names its runner...
    (job_dir / "exit_code").write_text(f"-9 {first}")  # ...so one the stopped run left late is never the restart's
    assert backend.poll(again, str(job_dir)).exit_code is None


def test_cancel_kills_a_job_that_ignores_sigterm_after_its_grace(tmp_path):
    """Cancel returns at once and, as Slurm's KillWait, a job still alive past the grace is killed
    (an endpoint's server that ignored SIGTERM stayed `stopping` for good)."""
    import sys

    from supercluster.cluster.backends.base import JobSpec
    from supercluster.cluster.backends.local import LocalBackend, _group_alive, _pid

    job_dir = tmp_path / "job"
    job_dir.mkdir()
    started = job_dir / "started"
    stubborn = [sys.executable, "-c", "import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                f"pathlib.Path({str(started)!r}).write_text('x'); time.sleep(600)"]
    backend = LocalBackend()
    ref = backend.submit(JobSpec(job_id=1, job_dir=str(job_dir), config="", overrides=(), nodes=("here",),
                                 gpus_per_node=1, max_restarts=0, command=tuple(stubborn)))
    while not started.exists():
        time.sleep(0.05)
    backend.cancel(ref, str(job_dir), grace_s=2.0)
    assert _group_alive(_pid(ref))  # returned at once: the stubborn job still lives
    deadline = time.monotonic() + 30
    while _group_alive(_pid(ref)):
        assert time.monotonic() < deadline, "a job ignoring SIGTERM outlived its cancel's grace"
        time.sleep(0.1)
