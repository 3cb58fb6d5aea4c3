"""A real Slurm (Debian slurm-wlm 22.05) emulating 4 nodes x 2 fake GPUs on this host, two leaf
switches under one spine: import the fleet, run the real trainer on a 2-node cluster, and
survive a node's death mid-job (requeue on a replacement, resume from the checkpoint)."""

import contextlib
import json
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from slurm_emulator import EmulatedSlurm, unavailable_reason
from supercluster.cluster import clusters, fleet, jobs
from supercluster.cluster.state import AllocationInterval, Database

pytestmark = [pytest.mark.slurm, pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))]

STEPS = 8


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    emu = EmulatedSlurm(tmp_path_factory.mktemp("slurm"), nodes=4, gpus_per_node=2, nodes_per_leaf=2)
    try:
        emu.start()
        yield emu
    finally:
        emu.stop()


@pytest.fixture(scope="module")
def db(slurm, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("SLURM_CONF", str(slurm.conf))
    db = Database(f"sqlite:///{tmp_path_factory.mktemp('slurmdb') / 'fleet.db'}")
    fleet.init_fleet(db, "slurm")
    return db


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def overrides(corpus):
    return [f"data.path={corpus}", "model.preset=tiny", f"train.steps={STEPS}", "train.checkpoint_every=4",
            "train.eval_every=100", "train.precision=fp32", "train.seq_len=32", "train.micro_batch=2", "train.global_batch=8"]


def losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_fleet_import_from_scontrol(db, slurm):
    info = fleet.summary(db)
    assert info["backend"] == "slurm" and (info["nodes"], info["gpus"]) == (4, 8)
    assert [(r["pod"], r["leaf"], r["nodes"]) for r in info["leaves"]] == [("spine1", "leaf1", 2), ("spine1", "leaf2", 2)]
    fleet.drain_node("node4", "health check failed", db=db)
    assert slurm.node_states()["node4"].startswith("drain")
    fleet.resume_node("node4", db=db)
    deadline = time.monotonic() + 30  # RESUME flags the node not-responding until slurmd answers a ping
    while slurm.node_states()["node4"] != "idle" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert slurm.node_states()["node4"] == "idle"
    assert fleet.nodes(db)[3]["state"] == "up"


@contextlib.contextmanager
def failing_commit():
    """The database refuses the next COMMIT (as a full disk or a PostgreSQL serialization failure would)."""
    def refuse(session):
        raise RuntimeError("forced: the database refused the commit")

    sa.event.listen(Session, "before_commit", refuse)
    try:
        yield
    finally:
        sa.event.remove(Session, "before_commit", refuse)


def test_a_rolled_back_transaction_leaves_no_reservation_and_no_job(db, slurm, tmp_path):
    def reservations():
        return subprocess.run(["scontrol", "show", "reservation"], env=slurm.env, capture_output=True, text=True).stdout

    def live_jobs():
        out = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=slurm.env, capture_output=True, text=True).stdout
        return [line for line in out.splitlines() if line.split()[1] in ("PENDING", "RUNNING", "CONFIGURING")]

    with failing_commit(), pytest.raises(RuntimeError, match="forced"):
        clusters.create_cluster(db, "undone", 4, wait=False)
    assert "supercluster-undone" not in reservations() and clusters.list_clusters(db) == []
    # nothing blocks the same request afterwards: the name and the nodes are free in Slurm too
    c = clusters.create_cluster(db, "undone", 4, wait=False)
    assert c["state"] == "ready" and c["reservation"] == "supercluster-undone"

    config = tmp_path / "tiny.toml"
    config.write_text("[model]\npreset = 'tiny'\n[train]\nseq_len = 64\n")
    jobs.jobs_root().mkdir(parents=True, exist_ok=True)
    dirs_before = set(jobs.jobs_root().iterdir())
    with failing_commit(), pytest.raises(RuntimeError, match="forced"):
        jobs.submit_job(db, "undone", str(config), ["train.steps=1000"], max_restarts=0)
    assert jobs.list_jobs(db) == [] and live_jobs() == []  # sbatch'ed, then cancelled with the rollback
    assert set(jobs.jobs_root().iterdir()) == dirs_before
    clusters.delete_cluster(db, "undone")
    assert "supercluster-undone" not in reservations()

    with failing_commit(), pytest.raises(RuntimeError, match="forced"):  # a drain is put back too
        fleet.drain_node("node3", "health: test", db=db)
    assert not slurm.node_states()["node3"].startswith("drain") and fleet.nodes(db)[2]["state"] == "up"
    deadline = time.monotonic() + 30  # resumed: not-responding until slurmd answers a ping
    while slurm.node_states()["node3"] != "idle" and time.monotonic() < deadline:
        time.sleep(0.5)


@pytest.fixture(scope="module")
def reference(db, slurm, small_corpus, tmp_path_factory):
    """An uninterrupted run on a 2-node cluster: the job finishes with a checkpoint."""
    c = clusters.create_cluster(db, "ref", 4, wait=False)
    assert c["leaves"] == 1 and len(c["nodes"]) == 2 and c["reservation"] == "supercluster-ref"
    shown = subprocess.run(["scontrol", "show", "reservation", "supercluster-ref"], env=slurm.env, capture_output=True, text=True)
    assert f"Nodes={c['nodes'][0]['name']}," in shown.stdout.replace("node[1-2]", "node1,node2"), shown.stdout
    config = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    config.write_text("[model]\npreset = 'tiny'\n[train]\nseq_len = 64\n")
    job = jobs.submit_job(db, "ref", str(config), overrides(small_corpus), max_restarts=0)
    final = jobs.wait_job(db, job["id"], timeout_s=240, poll_s=1)
    log = Path(jobs.log_path(db, job["id"])).read_text()
    clusters.delete_cluster(db, "ref")
    gone = subprocess.run(["scontrol", "show", "reservation"], env=slurm.env, capture_output=True, text=True).stdout
    assert "supercluster-ref" not in gone
    return final, log, config


def test_two_node_job_finishes_with_a_checkpoint(reference):
    final, log, _ = reference
    assert final["state"] == "completed" and final["exit_code"] == 0, log[-3000:]
    assert max(losses(final["run_dir"])) == STEPS
    assert (Path(final["run_dir"]) / "checkpoints" / f"step_{STEPS:08d}").is_dir()


def test_node_death_requeues_on_a_replacement_and_matches_the_uninterrupted_loss(db, slurm, reference, small_corpus):
    ref_final, _, config = reference
    c = clusters.create_cluster(db, "tough", 4, wait=False)
    before = [n["name"] for n in c["nodes"]]
    job = jobs.submit_job(db, "tough", str(config), overrides(small_corpus), max_restarts=2)
    ckpt = Path(job["run_dir"]) / "checkpoints" / "step_00000004"
    deadline = time.monotonic() + 180
    while not ckpt.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), Path(jobs.log_path(db, job["id"])).read_text()[-3000:]
    victim = before[1]
    slurm.kill_node(victim)

    final = jobs.wait_job(db, job["id"], timeout_s=240, poll_s=1)
    log = Path(jobs.log_path(db, job["id"])).read_text()
    assert final["state"] == "completed" and final["restarts"] >= 1, log[-4000:]
    after = [n["name"] for n in clusters.show_cluster(db, "tough")["nodes"]]
    assert victim not in after and before[0] in after and len(after) == 2
    with db.transaction(lock=False) as s:  # usage: the swap closed one interval and opened the next
        spans = s.scalars(sa.select(AllocationInterval).where(AllocationInterval.cluster_name == "tough")
                          .order_by(AllocationInterval.id)).all()
    assert [x.end_reason for x in spans] == ["nodes swapped", None]
    assert spans[0].nodes == before and spans[1].nodes == after and spans[0].ended_at == spans[1].started_at
    got, want = losses(final["run_dir"]), losses(ref_final["run_dir"])
    assert max(got) == STEPS
    assert got[STEPS] == pytest.approx(want[STEPS], rel=1e-4)
    slurm.start_node(victim)  # leave the emulated cluster whole for whoever comes next
