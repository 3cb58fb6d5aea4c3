"""Fleet database: migrations, health hooks, and concurrent creates that never share a node
(real processes, on SQLite and on the PostgreSQL server when it is reachable)."""

import contextlib
import fcntl
import multiprocessing
import os
import socket
import threading
import uuid

import pytest
import sqlalchemy as sa

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from supercluster.cluster import clusters, fleet, migrations
from supercluster.cluster.state import Base, Database, make_engine, on_rollback
from supercluster.errors import UserError

PG_URL = os.environ.get("SUPERCLUSTER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_unavailable() -> str | None:
    """Why there is no PostgreSQL server to test against, or None when there is one.

    Only a missing driver or a server nobody listens for counts; a server that answers and then
    refuses (bad credentials, no such database) is a broken setup and fails the test.
    """
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install -e '.[test]')"
    url = sa.make_url(PG_URL)
    try:
        socket.create_connection((url.host or "127.0.0.1", url.port or 5432), timeout=3).close()
    except OSError as err:
        return f"no PostgreSQL server listens at {url.host}:{url.port} ({err.strerror or err})"
    return None


@pytest.fixture
def pg_url():
    if reason := _pg_unavailable():
        pytest.skip(reason)
    import psycopg2

    schema = f"sc_test_{uuid.uuid4().hex[:10]}"  # private schema: parallel runs never collide
    conn = psycopg2.connect(PG_URL, connect_timeout=10)
    conn.autocommit = True
    conn.cursor().execute(f"CREATE SCHEMA {schema}")
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    conn.cursor().execute(f"DROP SCHEMA {schema} CASCADE")
    conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    return request.getfixturevalue("pg_url")


def _same_float(context, inspected, metadata, inspected_type, metadata_type):
    # SQLAlchemy 2.1 maps `float` to Double, the migrations say Float: both are REAL on SQLite
    # and double precision on PostgreSQL. Any other type difference is left to Alembic.
    if isinstance(inspected_type, sa.Float) and isinstance(metadata_type, sa.Float):
        return False
    return None


def schema_diff(conn) -> list:
    """Alembic's own comparison of the models with the migrated schema (tables, columns, types,
    nullability, indexes, foreign keys)."""
    return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": _same_float}), Base.metadata)


def test_migrations_reach_the_models_and_record_the_revision(url):
    db = Database(url)
    with db.engine.connect() as conn:
        diff = schema_diff(conn)
        assert diff == [], diff
        assert migrations.current_revision(conn) == migrations.head() == "0004_causes"
    assert migrations.upgrade(db.engine) == migrations.head()  # idempotent: nothing left to apply
    with db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_future'"))
    with pytest.raises(UserError, match="newer than this supercluster"):
        Database(db.url)
    db.dispose()


def test_a_database_from_before_alembic_is_adopted_with_its_data(url):
    """A schema_version-1 database (the hand-written migrations' only version) is stamped and upgraded."""
    engine = make_engine(url)
    with engine.begin() as conn:  # what the old code left: revision 1's tables and schema_version = 1
        command.upgrade(migrations.config(conn), "0001_initial")
        conn.execute(sa.text("DROP TABLE alembic_version"))
        conn.execute(sa.text("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at FLOAT)"))
        conn.execute(sa.text("INSERT INTO schema_version VALUES (1, 0)"))
        conn.execute(sa.text("""INSERT INTO fleet VALUES (1, 'sim', '{"spec": {"nodes": 2}}', 0)"""))
        for name in ("sim00001", "sim00002"):
            conn.execute(sa.text(f"INSERT INTO nodes (name, gpu_type, gpus, leaf, pod, state) "
                                 f"VALUES ('{name}', 'h100', 8, 'leaf0001', 'pod001', 'up')"))
        conn.execute(sa.text("INSERT INTO clusters (name, gpus, gpu_type, state, require_health, health_max_age_s, "
                             "bypassed, leaves, pods, lower_bound, created_at, placed_at) "
                             "VALUES ('kept', 8, 'h100', 'ready', false, 86400, 0, 1, 1, 1, 0, 0)"))
        conn.execute(sa.text("INSERT INTO allocations SELECT id, 'sim00001', 8 FROM clusters WHERE name = 'kept'"))
    engine.dispose()

    db = Database(url)  # adopts (stamps 0001_initial), then upgrades to head
    with db.engine.connect() as conn:
        assert migrations.current_revision(conn) == migrations.head()
        assert not sa.inspect(conn).has_table("schema_version")
        assert schema_diff(conn) == []
    kept = clusters.show_cluster(db, "kept")
    assert kept["state"] == "ready" and [n["name"] for n in kept["nodes"]] == ["sim00001"]
    assert (kept["priority"], kept["owner"], kept["detail"]) == (0, None, None)
    assert clusters.create_cluster(db, "new", 8, owner="t")["nodes"][0]["name"] == "sim00002"
    db.dispose()


def test_bad_database_url_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="database"):
        Database("nosuchdialect://x")
    with pytest.raises(UserError, match="Cannot open"):
        Database(f"sqlite:///{tmp_path}/missing/dir/fleet.db")


def test_record_health_validates_and_keeps_history(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    fleet.init_fleet(db, "sim", spec={"nodes": 2, "nodes_per_leaf": 2})
    with pytest.raises(UserError, match="No node"):
        fleet.record_health(db, "nosuch", [], passed=True)
    with pytest.raises(ValueError):
        fleet.record_health(db, "sim00001", [{"check": "gemm", "status": "ok"}], passed=True)
    for passed in (True, False):
        fleet.record_health(db, "sim00001", [{"check": "gemm", "value": 2, "unit": "TFLOP/s", "threshold": 1,
                                              "status": "passed" if passed else "failed"}], passed=passed)
    hist = fleet.health_history(db, node="sim00001")
    assert [h["status"] for h in hist] == ["failed", "passed"]
    assert fleet.nodes(db)[0]["last_health_status"] == "failed"


def _open_worker(url, barrier, results):
    barrier.wait()
    try:
        db = Database(url)
        with db.engine.connect() as conn:
            results.put(migrations.current_revision(conn))
    except Exception as err:  # reported, so that the test shows what went wrong
        results.put(repr(err))


def test_concurrent_first_opens_migrate_once(url):
    """Four processes open a fresh database at the same moment: one migrates, the others wait."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    workers = [ctx.Process(target=_open_worker, args=(url, barrier, results)) for _ in range(4)]
    for w in workers:
        w.start()
    got = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    assert got == [migrations.head()] * 4


def _wal_worker(path, barrier, results):
    import sqlite3

    from supercluster.cluster.state import _write_ahead_log

    barrier.wait()
    try:
        conn = sqlite3.connect(path, timeout=60, isolation_level=None)
        _write_ahead_log(conn)
        results.put(conn.execute("PRAGMA journal_mode").fetchone()[0])
    except Exception as err:
        results.put(repr(err))


def test_processes_switching_a_fresh_sqlite_file_to_wal_together_all_succeed(tmp_path):
    """SQLite answers "database is locked" at once, not after its busy timeout, to a connection
    switching a fresh file to WAL while others do (without the retry, two of three runs of this
    test failed on 2 cores): the fleet database's switch waits its turn instead, every time."""
    ctx = multiprocessing.get_context("fork")
    for attempt in range(20):
        barrier, results = ctx.Barrier(6), ctx.Queue()
        workers = [ctx.Process(target=_wal_worker, args=(str(tmp_path / f"{attempt}.db"), barrier, results)) for _ in range(6)]
        for w in workers:
            w.start()
        got = [results.get(timeout=120) for _ in workers]
        for w in workers:
            w.join(timeout=60)
        assert got == ["wal"] * 6, got


def _hold_a_write(url, holding, release):
    with Database(url).transaction(lock=False):
        holding.set()
        release.wait(60)


def test_sqlite_writers_of_other_processes_queue_on_a_file_lock(tmp_path):
    """A SQLite writer in another process holds `<file>-writers` locked (the kernel wakes the next
    waiter when it is let go; SQLite's own lock makes waiters poll), and only while it writes."""
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    Database(url).dispose()
    ctx = multiprocessing.get_context("fork")
    holding, release = ctx.Event(), ctx.Event()
    writer = ctx.Process(target=_hold_a_write, args=(url, holding, release))
    writer.start()
    try:
        assert holding.wait(60)
        with open(tmp_path / "fleet.db-writers") as lock:
            with pytest.raises(BlockingIOError):
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            release.set()
            writer.join(60)
            assert writer.exitcode == 0
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once it committed
    finally:
        release.set()
        writer.join(60)


def test_a_disposed_database_closes_its_writers_file(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")

    def open_lock_files() -> int:
        targets = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        return targets.count(str(tmp_path / "fleet.db-writers"))

    with db.transaction(lock=False):
        pass
    assert open_lock_files() == 1
    db.dispose()
    assert open_lock_files() == 0
    with db.transaction(lock=False):  # opened again by the next writer
        pass
    assert open_lock_files() == 1
    db.dispose()


def _create_worker(url, name, barrier, results):
    barrier.wait()  # all processes ask at the same moment
    try:
        c = clusters.create_cluster(Database(url), name, 8, wait=False)
        results.put((name, [n["name"] for n in c["nodes"]]))
    except UserError:
        results.put((name, None))


def test_concurrent_creates_never_share_a_node(url):
    db = Database(url)
    fleet.init_fleet(db, "sim", spec={"nodes": 5, "gpus_per_node": 8, "nodes_per_leaf": 4, "leaves_per_pod": 2})
    db.dispose()
    ctx = multiprocessing.get_context("fork")
    procs, barrier, results = 8, ctx.Barrier(8), ctx.Queue()
    workers = [ctx.Process(target=_create_worker, args=(url, f"c{i}", barrier, results)) for i in range(procs)]
    for w in workers:
        w.start()
    got = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    placed = [nodes for _, nodes in got if nodes]
    assert len(placed) == 5  # five nodes, eight requests: exactly five win
    flat = [n for nodes in placed for n in nodes]
    assert len(flat) == len(set(flat)) == 5
    listed = clusters.list_clusters(Database(url))
    assert sorted(c["name"] for c in listed) == sorted(name for name, nodes in got if nodes)


def test_external_effects_are_undone_only_when_the_transaction_does_not_commit(url):
    """`on_rollback` undos run newest first on an error (ours or at COMMIT), never after a commit."""
    db = Database(url)
    fleet.init_fleet(db, "sim", spec={"nodes": 2, "nodes_per_leaf": 2})
    undone = []
    with db.transaction() as s:
        on_rollback(s, lambda: undone.append("reservation"))
    assert undone == []
    with pytest.raises(RuntimeError, match="after the effects"):
        with db.transaction() as s:
            db.fleet(s).settings = {"changed": True}
            on_rollback(s, lambda: undone.append("reservation"))
            on_rollback(s, lambda: undone.append("job"))
            raise RuntimeError("after the effects")
    assert undone == ["job", "reservation"]
    assert fleet.summary(db)["backend"] == "sim"  # and the database change was rolled back with them
    with db.transaction(lock=False) as s:
        assert db.fleet(s).settings != {"changed": True}


def test_a_failing_undo_does_not_hide_the_error(tmp_path, caplog):
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    fleet.init_fleet(db, "sim", spec={"nodes": 2, "nodes_per_leaf": 2})

    def broken_undo():
        raise OSError("scontrol: connection refused")

    with pytest.raises(RuntimeError, match="the real error"):
        with db.transaction() as s:
            on_rollback(s, broken_undo)
            raise RuntimeError("the real error")
    assert "scontrol: connection refused" in caplog.text


def test_readers_neither_wait_for_a_writer_nor_see_what_it_has_not_committed(url):
    """`Database.reading` runs beside an open write transaction (on SQLite too, whose writers
    take the one write lock at BEGIN) and reads the last committed state."""
    db = Database(url)
    fleet.init_fleet(db, "sim", spec={"nodes": 2, "nodes_per_leaf": 2})
    writing, read = threading.Event(), threading.Event()
    seen = []

    def reader():
        writing.wait(30)
        with db.reading() as s:
            seen.append(db.fleet(s).settings)
        read.set()

    thread = threading.Thread(target=reader)
    thread.start()
    with db.transaction() as s:
        db.fleet(s).settings = {"uncommitted": True}
        s.flush()
        writing.set()
        done = read.wait(30)  # a reader that waited for this lock would only run after the commit
    thread.join(30)
    assert done and seen and seen[0] != {"uncommitted": True}
    db.dispose()
