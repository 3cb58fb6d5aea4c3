"""Tenancy on the fleet: usage from allocation intervals, priorities with preemption
(simulated fleet for placement and states; a real tiny job on the local backend resumes)."""

import json
import time
from pathlib import Path

import pytest

from supercluster.cluster import clusters, fleet, jobs, preempt, queue, usage
from supercluster.cluster.state import Database
from supercluster.errors import UserError
from supercluster.train import checkpoint


@pytest.fixture
def clock(monkeypatch):
    """A settable clock in every module that stamps cluster times."""
    t = {"now": 1_000.0}
    for module in (clusters, queue, usage, preempt, jobs):
        monkeypatch.setattr(module, "now", lambda: t["now"])
    return t


def sim_db(tmp_path, nodes=4, per_leaf=4) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    fleet.init_fleet(db, "sim", spec={"nodes": nodes, "gpus_per_node": 8, "nodes_per_leaf": per_leaf, "leaves_per_pod": 4})
    return db


def by_owner(rows):
    return {(r["owner"], r["gpu_type"]): r["gpu_seconds"] for r in rows}


def test_usage_sums_gpu_seconds_per_owner_and_type_over_any_period(tmp_path, clock):
    db = sim_db(tmp_path)
    clusters.create_cluster(db, "a", 16, owner="team-a")  # 16 GPUs from t=1000
    clock["now"] = 1_100.0
    clusters.create_cluster(db, "b", 8, owner="team-b")  # 8 GPUs from t=1100
    clock["now"] = 1_400.0
    clusters.delete_cluster(db, "a")  # a held 16 GPUs for 400 s
    clock["now"] = 1_500.0
    rows = usage.usage(db)  # b still runs: counted up to now
    assert by_owner(rows) == {("team-a", "h100"): pytest.approx(16 * 400), ("team-b", "h100"): pytest.approx(8 * 400)}
    assert rows[0]["owner"] == "team-a" and rows[0]["gpu_hours"] == pytest.approx(16 * 400 / 3600)
    # A window clips every interval: [1200, 1300) is 100 s of each.
    assert by_owner(usage.usage(db, since=1_200, until=1_300)) == {("team-a", "h100"): pytest.approx(1600),
                                                                   ("team-b", "h100"): pytest.approx(800)}
    assert usage.usage(db, since=2_000, until=3_000) == []  # b is open, but now is before the period
    total = usage.usage(db, group_by=["gpu_type"])
    assert total == [{"gpu_type": "h100", "gpu_seconds": pytest.approx(16 * 400 + 8 * 400), "gpu_hours": pytest.approx(9600 / 3600)}]
    with pytest.raises(UserError, match="group usage by"):
        usage.usage(db, group_by=["project"])
    with pytest.raises(UserError, match="swap since and until"):
        usage.usage(db, since=5, until=1)


def test_preemption_takes_the_lowest_priority_youngest_first_and_requeues_them(tmp_path, clock):
    db = sim_db(tmp_path)
    clusters.create_cluster(db, "keep", 16, priority=1)  # higher than the other two: never a victim here
    clock["now"] += 10
    clusters.create_cluster(db, "old", 8)
    clock["now"] += 10
    clusters.create_cluster(db, "young", 8)
    clock["now"] += 10
    assert clusters.create_cluster(db, "same", 8)["state"] == "queued"  # equal priority never preempts
    clusters.delete_cluster(db, "same")

    high = clusters.create_cluster(db, "high", 16, priority=5, owner="urgent")
    assert high["state"] == "ready" and len(high["nodes"]) == 2
    shown = {c["name"]: c for c in clusters.list_clusters(db)}
    assert shown["keep"]["state"] == "ready"
    for name in ("old", "young"):
        assert shown[name]["state"] == "queued" and shown[name]["nodes"] == []
        assert shown[name]["detail"] == "preempted by cluster 'high' (priority 5 over 0)"
    assert (shown["old"]["queue_position"], shown["young"]["queue_position"]) == (1, 2)  # their old order
    ended = {r["cluster"]: r for r in usage.usage(db, group_by=["cluster"])}
    assert ended["young"]["gpu_seconds"] == pytest.approx(8 * 10)  # its interval closed at the preemption

    clock["now"] += 10
    assert clusters.delete_cluster(db, "high") == ["old", "young"]  # both placed again, oldest first
    again = clusters.show_cluster(db, "young")
    assert again["state"] == "ready" and again["detail"] is None


def test_preemption_takes_as_few_clusters_as_it_can(tmp_path, clock):
    db = sim_db(tmp_path, nodes=4, per_leaf=4)
    clusters.create_cluster(db, "big", 16)
    clock["now"] += 1
    clusters.create_cluster(db, "small", 8)  # youngest: taken first, then found unnecessary
    clock["now"] += 1
    clusters.create_cluster(db, "rest", 8, priority=9)
    high = clusters.create_cluster(db, "high", 16, priority=2, wait=False)
    assert high["state"] == "ready"
    states = {c["name"]: c["state"] for c in clusters.list_clusters(db)}
    assert states == {"big": "queued", "small": "ready", "rest": "ready", "high": "ready"}
    with pytest.raises(UserError, match="do not fit now"):  # only higher-priority clusters hold the rest
        clusters.create_cluster(db, "more", 16, priority=2, wait=False)


def test_a_held_cluster_frees_its_nodes_stops_being_charged_and_comes_back_when_released(tmp_path, clock):
    db = sim_db(tmp_path, nodes=2, per_leaf=2)
    clusters.create_cluster(db, "a", 16, owner="team-a")
    clock["now"] += 100
    held = clusters.hold_cluster(db, "a", "budget spent")
    assert held["state"] == "held" and held["nodes"] == [] and held["detail"] == "budget spent"
    assert clusters.create_cluster(db, "b", 8)["state"] == "ready"  # its nodes went to the queue
    clock["now"] += 100
    assert by_owner(usage.usage(db)) == {("team-a", "h100"): pytest.approx(16 * 100), (None, "h100"): pytest.approx(8 * 100)}
    clusters.delete_cluster(db, "b")
    assert clusters.show_cluster(db, "a")["state"] == "held"  # freed nodes never go to a held cluster
    back = clusters.release_cluster(db, "a")
    assert back["state"] == "ready" and len(back["nodes"]) == 2 and back["detail"] is None


@pytest.mark.slow
def test_a_preempted_local_job_requeues_and_resumes_from_its_checkpoint(tmp_path, tiny_job):
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    fleet.init_fleet(db, "local", gpus=1)
    clusters.create_cluster(db, "low", 1, owner="batch")
    config = tmp_path / "tiny.toml"
    config.write_text("")
    # A tiny step takes about 5 ms on a quiet core: 150 steps keep the run going well past its first
    # checkpoint (step 20) while the test preempts it; with 24 it could finish before the preemption.
    job = jobs.submit_job(db, "low", str(config), tiny_job(150, checkpoint_every=20), max_restarts=0)
    checkpoints = Path(job["run_dir"]) / "checkpoints"
    deadline = time.monotonic() + 240
    while checkpoint.latest(checkpoints) is None and time.monotonic() < deadline:  # a complete one
        assert jobs.job_status(db, job["id"])["state"] in ("pending", "running")
        time.sleep(0.02)
    assert checkpoint.latest(checkpoints), Path(jobs.log_path(db, job["id"])).read_text()[-3000:]

    high = clusters.create_cluster(db, "high", 1, priority=1, owner="urgent")
    assert high["state"] == "ready"
    stopped = jobs.job_status(db, job["id"])
    assert stopped["state"] == "pending" and stopped["preemptions"] == 1 and stopped["backend_ref"] is None
    assert "preempted by cluster 'high'" in stopped["detail"]
    assert clusters.show_cluster(db, "low")["detail"].startswith("preempted by cluster 'high'")
    assert not (Path(job["job_dir"]) / "exit_code").exists()

    assert clusters.delete_cluster(db, "high") == ["low"]
    final = jobs.wait_job(db, job["id"], timeout_s=300, poll_s=1)
    log = Path(jobs.log_path(db, job["id"])).read_text()
    assert final["state"] == "completed" and final["exit_code"] == 0, log[-3000:]
    summary = json.loads((Path(final["run_dir"]) / "summary.json").read_text())
    assert summary["resumed_from"] and "step_" in summary["resumed_from"], summary
    owners = {r["owner"] for r in usage.usage(db)}
    assert owners == {"batch", "urgent"}
    clusters.delete_cluster(db, "low")
