"""Placement on simulated fleets: fewest switches, then pods, then best fit; queueing; health gate."""

import pytest
import sqlalchemy as sa

from supercluster.cluster import clusters, fleet, placement, queue
from supercluster.cluster.state import Cluster, Database
from supercluster.errors import UserError

BIG = {"gpu_type": "h100", "nodes": 1280, "gpus_per_node": 8, "nodes_per_leaf": 32, "leaves_per_pod": 16}


def make_db(tmp_path, **spec) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    fleet.init_fleet(db, "sim", spec=spec)
    return db


@pytest.fixture(scope="module")
def big_db(tmp_path_factory):
    return make_db(tmp_path_factory.mktemp("big"), **BIG)


def nodes_of(c):
    return [n["name"] for n in c["nodes"]]


def test_sim_fleet_is_the_fat_tree_of_its_spec(big_db):
    info = fleet.summary(big_db)
    assert (info["nodes"], info["gpus"], info["free_gpus"]) == (1280, 10240, 10240)
    assert len(info["leaves"]) == 40 and info["pods"] == 3
    assert all(r["nodes"] == 32 for r in info["leaves"])


def test_thousand_gpus_on_the_minimum_number_of_leaf_switches(big_db):
    c = clusters.create_cluster(big_db, "k", 1000, wait=False)
    try:
        assert c["state"] == "ready" and len(c["nodes"]) == 125 and sum(n["gpus"] for n in c["nodes"]) == 1000
        assert c["lower_bound"] == 4  # ceil(125 nodes / 32 per leaf)
        assert c["leaves"] == len(c["switches"]) == 4 and c["pods"] == 1
    finally:
        clusters.delete_cluster(big_db, "k")


def test_fewest_leaves_beats_fewest_pods_and_best_fit_picks_the_tightest_leaf():
    free = [placement.Free(f"a{i}", "leafA", "pod1", 8, 8) for i in range(3)]
    free += [placement.Free(f"b{i}", "leafB", "pod1", 8, 8) for i in range(3)]
    free += [placement.Free(f"c{i}", "leafC", "pod2", 8, 8) for i in range(6)]
    p = placement.place(free, 40, 8)  # 5 nodes: only leafC holds them on one switch
    assert p.leaves == 1 and {n for n, _ in p.nodes} == {f"c{i}" for i in range(5)}
    p = placement.place(free, 16, 8)  # fits in A, B or C: best fit is a 3-node leaf, A by name
    assert p.leaves == 1 and {n for n, _ in p.nodes} <= {"a0", "a1", "a2"}
    # 9 nodes need 2 leaves; C+A or C+B (one pod each side) beat nothing smaller: 2 pods either way,
    # but A+B+... would be 3 leaves. Check the count of leaves and pods.
    p = placement.place(free, 72, 8)
    assert (p.leaves, p.pods) == (2, 2)


def test_fewest_pods_among_placements_with_the_same_leaf_count():
    # Two leaves are needed either way; pod1 has two leaves of 4, pod2 and pod3 one leaf of 5 each.
    free = [placement.Free(f"x{i}", "leafX", "pod1", 8, 8) for i in range(4)]
    free += [placement.Free(f"y{i}", "leafY", "pod1", 8, 8) for i in range(4)]
    free += [placement.Free(f"p{i}", "leafP", "pod2", 8, 8) for i in range(5)]
    free += [placement.Free(f"q{i}", "leafQ", "pod3", 8, 8) for i in range(5)]
    p = placement.place(free, 64, 8)  # 8 nodes
    assert (p.leaves, p.pods) == (2, 1)
    assert {n[0] for n, _ in p.nodes} == {"x", "y"}


def test_partial_node_requests_pack_onto_partly_used_nodes():
    free = [placement.Free("n1", "l", "p", 8, 8), placement.Free("n2", "l", "p", 5, 8), placement.Free("n3", "l", "p", 2, 8)]
    assert placement.place(free, 4, 8).nodes == (("n2", 4),)  # tightest node that fits
    assert placement.place(free, 2, 8).nodes == (("n3", 2),)
    assert placement.place(free, 16, 8) is None  # needs two whole free nodes; only n1 is
    with pytest.raises(ValueError):
        placement.place(free, 9, 8)


def test_max_switches_rejects_spread_placements():
    free = [placement.Free(f"l{leaf}n{i}", f"l{leaf}", "p", 8, 8) for leaf in range(3) for i in range(2)]
    assert placement.place(free, 32, 8).leaves == 2
    assert placement.place(free, 32, 8, max_switches=1) is None


def test_fragmentation_small_requests_fill_partly_used_leaves_first(tmp_path):
    db = make_db(tmp_path, nodes=8, gpus_per_node=8, nodes_per_leaf=4, leaves_per_pod=2)
    clusters.create_cluster(db, "one", 8, wait=False)  # leaf0001 now has 3 free nodes, leaf0002 has 4
    two = clusters.create_cluster(db, "two", 16, wait=False)
    assert two["switches"] == ["leaf0001"]  # best fit: the partly used leaf, keeping leaf0002 whole
    four = clusters.create_cluster(db, "four", 32, wait=False)
    assert four["switches"] == ["leaf0002"] and four["leaves"] == four["lower_bound"] == 1
    half = clusters.create_cluster(db, "half", 4, wait=False)
    assert half["state"] == "ready" and len(half["nodes"]) == 1 and half["nodes"][0]["gpus"] == 4
    quarter = clusters.create_cluster(db, "quarter", 2, wait=False)
    assert quarter["nodes"][0]["name"] == half["nodes"][0]["name"]  # packed on the partly used node


def test_queue_is_fifo_with_backfill(tmp_path):
    db = make_db(tmp_path, nodes=4, gpus_per_node=8, nodes_per_leaf=2, leaves_per_pod=2)
    clusters.create_cluster(db, "a", 24)
    big = clusters.create_cluster(db, "big", 16)  # only one node free: waits
    assert big["state"] == "queued" and big["queue_position"] == 1
    later = clusters.create_cluster(db, "later", 24)
    assert later["state"] == "queued" and later["queue_position"] == 2
    small = clusters.create_cluster(db, "small", 8)  # fits now: backfills past both
    assert small["state"] == "ready"
    clusters.delete_cluster(db, "small")
    assert clusters.show_cluster(db, "big")["state"] == "queued"  # one node is not enough for it
    started = clusters.delete_cluster(db, "a")  # four nodes free: the oldest first, then too few for "later"
    assert started == ["big"]
    assert clusters.show_cluster(db, "later")["state"] == "queued"
    assert clusters.delete_cluster(db, "big") == ["later"]


def test_backfill_stops_once_the_head_was_bypassed_enough(tmp_path, monkeypatch):
    monkeypatch.setattr(queue, "BACKFILL_LIMIT", 1)
    db = make_db(tmp_path, nodes=4, gpus_per_node=8, nodes_per_leaf=2, leaves_per_pod=2)
    clusters.create_cluster(db, "a", 16)
    clusters.create_cluster(db, "head", 32)
    assert clusters.create_cluster(db, "b1", 8)["state"] == "ready"  # head bypassed once
    assert clusters.create_cluster(db, "b2", 8)["state"] == "queued"  # limit reached: waits behind head


def test_every_placement_counts_against_each_request_it_passes(tmp_path, monkeypatch):
    """Two requests wait; each backfill counts once against both (in the database, not only in the
    pass), and the limit is reached by the one bypassed most."""
    monkeypatch.setattr(queue, "BACKFILL_LIMIT", 2)
    db = make_db(tmp_path, nodes=8, gpus_per_node=8, nodes_per_leaf=4, leaves_per_pod=2)
    clusters.create_cluster(db, "a", 40)
    assert clusters.create_cluster(db, "head", 64)["state"] == "queued"
    assert clusters.create_cluster(db, "b1", 8)["state"] == "ready"  # head bypassed once
    assert clusters.create_cluster(db, "second", 32)["state"] == "queued"  # 2 nodes free: waits too
    assert clusters.create_cluster(db, "b2", 8)["state"] == "ready"  # head twice, second once
    with db.reading() as s:
        bypassed = dict(s.execute(sa.select(Cluster.name, Cluster.bypassed).where(Cluster.state == "queued")).all())
    assert bypassed == {"head": 2, "second": 1}
    assert clusters.create_cluster(db, "b3", 8)["state"] == "queued"  # a node is free, but head's limit is reached


def test_backfill_reaches_a_request_pages_down_the_queue(tmp_path, monkeypatch):
    """The queue is read a page at a time and its walk stops once every kind waiting was refused:
    a small request behind 40 large ones (past the first page) still backfills a freed node."""
    db = make_db(tmp_path, nodes=4, gpus_per_node=8, nodes_per_leaf=2, leaves_per_pod=2)
    clusters.create_cluster(db, "a", 24)
    clusters.create_cluster(db, "b", 8)
    for i in range(40):
        assert clusters.create_cluster(db, f"q{i}", 16)["state"] == "queued"
    walked = []

    def counted(conn, rows=queue._queue_rows):
        for row in rows(conn):
            walked.append(row.name)
            yield row

    monkeypatch.setattr(queue, "_queue_rows", counted)
    assert clusters.create_cluster(db, "q40", 16)["state"] == "queued"
    assert walked == ["q0", "q1"]  # q0 refused, and the queue holds no other kind: the walk stops
    assert clusters.create_cluster(db, "small", 8)["queue_position"] == 42
    assert queue._QUEUE_PAGE < 42
    assert clusters.delete_cluster(db, "b") == ["small"]  # one node free: too small for any q
    assert clusters.delete_cluster(db, "a") == ["q0"]  # three free: the oldest first, then none fits
    assert clusters.show_cluster(db, "q1")["queue_position"] == 1


def test_clusters_named_by_a_query_are_described_as_named_by_a_list(tmp_path):
    """`cluster_dicts` with `among` (a SELECT of the clusters' ids, as the service names a
    project's) says what it says given the ids themselves: nodes and their status, places in the
    queue, jobs."""
    db = make_db(tmp_path, nodes=4, gpus_per_node=8, nodes_per_leaf=2, leaves_per_pod=2)
    for name, gpus, owner in (("a", 4, "p1"), ("b", 8, "p2"), ("c", 8, "p1"), ("d", 16, "p1"), ("e", 8, "p2"), ("f", 4, "p1"),
                              ("g", 8, "p2"), ("h", 16, "p1")):
        clusters.create_cluster(db, name, gpus, owner=owner)
    among = sa.select(Cluster.id).where(Cluster.owner == sa.bindparam("owner"))
    with db.reading() as s:
        rows = s.execute(sa.select(*Cluster.__table__.c).where(Cluster.owner == "p1").order_by(Cluster.id)).all()
        by_list = clusters.cluster_dicts(s, rows)
        by_query = clusters.cluster_dicts(s, rows, among, {"owner": "p1"})
    assert by_query == by_list
    assert [(c["name"], c["state"], c["queue_position"]) for c in by_list] == [
        ("a", "ready", None), ("c", "ready", None), ("d", "queued", 1), ("f", "ready", None), ("h", "queued", 3)]
    assert by_list[0]["nodes"][0]["status"] == "allocated"  # a's node, shared with f


def test_no_wait_fails_without_changing_state(tmp_path):
    db = make_db(tmp_path, nodes=4, gpus_per_node=8, nodes_per_leaf=2, leaves_per_pod=2)
    clusters.create_cluster(db, "a", 24)
    before = fleet.summary(db)
    with pytest.raises(UserError, match="do not fit now"):
        clusters.create_cluster(db, "b", 16, wait=False)
    assert fleet.summary(db) == before and [c["name"] for c in clusters.list_clusters(db)] == ["a"]


def test_health_gate_drain_failed_stale_and_unchecked(tmp_path):
    db = make_db(tmp_path, nodes=4, gpus_per_node=8, nodes_per_leaf=4, leaves_per_pod=1)
    fleet.drain_node("sim00001", "gemm below threshold", db=db)
    fleet.record_health(db, "sim00002", [{"check": "gemm", "value": 1.0, "unit": "TFLOP/s", "threshold": 2.0,
                                          "status": "failed", "detail": "slow"}], passed=False)
    fleet.record_health(db, "sim00003", [{"check": "gemm", "value": 3.0, "unit": "TFLOP/s", "threshold": 2.0,
                                          "status": "passed", "detail": None}], passed=True, measured_at=1.0)  # stale
    fleet.record_health(db, "sim00004", [{"check": "gemm", "value": 3.0, "unit": "TFLOP/s", "threshold": 2.0,
                                          "status": "passed", "detail": None}], passed=True)
    one = clusters.create_cluster(db, "one", 8, wait=False)
    assert nodes_of(one) == ["sim00004"]
    with pytest.raises(UserError):
        clusters.create_cluster(db, "two", 8, wait=False)
    assert fleet.nodes(db, cluster="one")[0]["last_health_status"] == "passed"
    hist = fleet.health_history(db, node="sim00002")
    assert hist[0]["status"] == "failed" and hist[0]["value"] == 1.0 and hist[0]["unit"] == "TFLOP/s"

    clusters.delete_cluster(db, "one")
    # Never-checked nodes are allowed by default, refused with require_health.
    fleet.resume_node("sim00001", db=db)
    with pytest.raises(UserError):
        clusters.create_cluster(db, "strict", 16, wait=False, require_health=True)  # only sim00004 qualifies
    assert nodes_of(clusters.create_cluster(db, "lax", 16, wait=False)) == ["sim00001", "sim00004"]


def test_resume_starts_queued_clusters(tmp_path):
    db = make_db(tmp_path, nodes=2, gpus_per_node=8, nodes_per_leaf=2, leaves_per_pod=1)
    fleet.drain_node("sim00002", "maintenance", db=db)
    assert clusters.create_cluster(db, "both", 16)["state"] == "queued"
    assert fleet.nodes(db)[1]["status"] == "drained"
    fleet.resume_node("sim00002", db=db)
    assert clusters.show_cluster(db, "both")["state"] == "ready"


def test_mixed_fleet_needs_a_gpu_type(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    spec = {"group": [{"gpu_type": "h100", "nodes": 2, "nodes_per_leaf": 2},
                      {"gpu_type": "a100", "nodes": 2, "nodes_per_leaf": 2}]}
    fleet.init_fleet(db, "sim", spec=spec)
    with pytest.raises(UserError, match="--gpu-type"):
        clusters.create_cluster(db, "x", 8)
    c = clusters.create_cluster(db, "x", 16, gpu_type="A100")  # alias of a100-80gb
    assert c["gpu_type"] == "a100-80gb" and c["switches"] == ["leaf0002"]


def test_spread_requests_prefer_the_leaves_with_least_room_to_spare():
    # 6 nodes need two leaves whichever we take; the two 3-node leaves do it and keep the 4s whole.
    free = [placement.Free(f"{leaf}{i}", leaf, "pod", 8, 8) for leaf, n in (("F1", 4), ("F2", 4), ("P1", 3), ("P2", 3))
            for i in range(n)]
    p = placement.place(free, 48, 8)
    assert p.leaves == 2 and {n[:2] for n, _ in p.nodes} == {"P1", "P2"}


def test_requests_alike_are_placed_in_turn_until_one_does_not_fit(tmp_path):
    """The queue searches once for requests alike that do not fit, but tries again after a placement."""
    db = make_db(tmp_path, nodes=4, gpus_per_node=8, nodes_per_leaf=2, leaves_per_pod=2)
    clusters.create_cluster(db, "a", 32)
    for name in ("b", "c", "d"):
        assert clusters.create_cluster(db, name, 16)["state"] == "queued"
    assert clusters.delete_cluster(db, "a") == ["b", "c"]  # d finds the fleet full again
    assert clusters.show_cluster(db, "d")["queue_position"] == 1
    assert clusters.delete_cluster(db, "b") == ["d"]


def test_a_new_fleet_replaces_the_topology_placement_keeps(tmp_path):
    db = make_db(tmp_path, nodes=4, gpus_per_node=8, nodes_per_leaf=2, leaves_per_pod=2)
    clusters.create_cluster(db, "a", 32)  # the first fleet's nodes, as placement keeps them
    clusters.delete_cluster(db, "a")
    fleet.init_fleet(db, "sim", spec={"nodes": 8, "gpus_per_node": 8, "nodes_per_leaf": 4, "leaves_per_pod": 2}, force=True)
    big = clusters.create_cluster(db, "big", 64, wait=False)  # more GPUs than the first fleet had
    assert len(big["nodes"]) == 8 and big["leaves"] == big["lower_bound"] == 2
