"""Fleet state: the SQLAlchemy models and the database that holds them.

SQLite file `$SUPERCLUSTER_HOME/fleet.db` by default; any SQLAlchemy URL through
`$SUPERCLUSTER_DB` or `--db` (PostgreSQL is tested). Every change goes through
`Database.transaction()`, which takes the fleet's write lock first (SQLite `BEGIN IMMEDIATE`,
PostgreSQL `SELECT ... FOR UPDATE` on the one fleet row), so two commands that race for nodes
are served one after the other and never see the same node as free. A read that changes nothing
uses `Database.reading()` instead, which takes neither lock.

Times are float seconds since the epoch (portable across SQLite and PostgreSQL).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
import threading
import time
import weakref
from typing import Callable, Iterator

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from supercluster.cluster import migrations
from supercluster.errors import UserError, closest
from supercluster.paths import home

log = logging.getLogger(__name__)

# Node.state is what the operator or the hardware says; allocation is separate (Allocation rows),
# as in Slurm where DRAIN is a flag on top of IDLE/ALLOCATED.
NODE_STATES = ("up", "drain", "down")
HEALTH_STATUSES = ("passed", "failed", "skipped")
CLUSTER_STATES = ("queued", "ready", "held")  # held: taken off the queue by its owner (a budget), not placed
JOB_ACTIVE = ("pending", "running")
JOB_STATES = ("pending", "running", "completed", "failed", "cancelled")
# A job preempted with its cluster is pending with no backend_ref until the cluster is placed again.
DEFAULT_HEALTH_MAX_AGE_S = 24 * 3600.0


class Base(DeclarativeBase):
    pass


class Fleet(Base):
    """The one row that says which backend the fleet lives on; its row lock serializes placement."""

    __tablename__ = "fleet"
    id: Mapped[int] = mapped_column(primary_key=True)
    backend: Mapped[str] = mapped_column(sa.String(16))
    settings: Mapped[dict] = mapped_column(sa.JSON)  # backend settings (slurm conf dir, sim spec, ...)
    created_at: Mapped[float]


class Node(Base):
    __tablename__ = "nodes"
    name: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    gpu_type: Mapped[str] = mapped_column(sa.String(64))
    gpus: Mapped[int]
    leaf: Mapped[str] = mapped_column(sa.String(128))
    pod: Mapped[str] = mapped_column(sa.String(128))
    address: Mapped[str | None] = mapped_column(sa.String(256))
    state: Mapped[str] = mapped_column(sa.String(16), default="up")  # up | drain | down
    reason: Mapped[str | None] = mapped_column(sa.Text)
    last_health_status: Mapped[str | None] = mapped_column(sa.String(16))  # passed | failed | None
    last_health_at: Mapped[float | None]
    allocations: Mapped[list[Allocation]] = relationship(back_populates="node")

    @property
    def used_gpus(self) -> int:
        return sum(a.gpus for a in self.allocations)

    @property
    def status(self) -> str:
        return node_status(self.state, self.gpus, self.used_gpus)


def plain(rows: list) -> list:
    """A query's rows as named tuples (ORM objects, or anything else, as they come): an attribute
    of SQLAlchemy's `Row` costs about ten times a named tuple's, and the busiest lists read
    thousands (a project's 200 clusters, 16 attributes each: 1.1 ms against 0.1)."""
    if not rows or not isinstance(rows[0], sa.Row):
        return rows
    make = _plain_type(rows[0]._fields)._make
    return [make(row) for row in rows]


@functools.lru_cache(maxsize=64)
def _plain_type(fields: tuple[str, ...]) -> type:
    return collections.namedtuple("PlainRow", fields, rename=True)


def node_status(state: str, gpus: int, used: int) -> str:
    """What `fleet show` prints: idle, mixed, allocated, draining, drained or down (Slurm's words)."""
    if state == "down":
        return "down"
    if state == "drain":
        return "draining" if used else "drained"
    return "idle" if not used else "allocated" if used >= gpus else "mixed"


class Cluster(Base):
    __tablename__ = "clusters"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(sa.String(64), unique=True)
    gpus: Mapped[int]
    gpu_type: Mapped[str] = mapped_column(sa.String(64))
    state: Mapped[str] = mapped_column(sa.String(16))  # queued | ready | held
    max_switches: Mapped[int | None]
    require_health: Mapped[bool]
    health_max_age_s: Mapped[float]
    bypassed: Mapped[int] = mapped_column(default=0)  # times a later request started first (backfill)
    leaves: Mapped[int | None]
    pods: Mapped[int | None]
    lower_bound: Mapped[int | None]  # fewest leaf switches any placement of this size could use
    backend_ref: Mapped[str | None] = mapped_column(sa.String(128))  # e.g. the Slurm reservation
    created_at: Mapped[float]
    placed_at: Mapped[float | None]
    owner: Mapped[str | None] = mapped_column(sa.String(128), index=True)  # opaque tag (the service's project)
    priority: Mapped[int] = mapped_column(default=0)  # higher may reclaim nodes from lower (preemption)
    cause: Mapped[dict | None] = mapped_column(sa.JSON)  # why it waits: who preempted it, or its hold (preempt.describe)
    detail: Mapped[str | None] = mapped_column(sa.Text)  # the same in words, as databases before `cause` kept it
    allocations: Mapped[list[Allocation]] = relationship(
        back_populates="cluster", cascade="all, delete-orphan", order_by="Allocation.node_name"
    )

    @property
    def node_names(self) -> list[str]:
        return [a.node_name for a in self.allocations]


class Allocation(Base):
    __tablename__ = "allocations"
    cluster_id: Mapped[int] = mapped_column(sa.ForeignKey("clusters.id", ondelete="CASCADE"), primary_key=True)
    node_name: Mapped[str] = mapped_column(sa.String(128), sa.ForeignKey("nodes.name"), primary_key=True, index=True)
    gpus: Mapped[int]
    cluster: Mapped[Cluster] = relationship(back_populates="allocations")
    node: Mapped[Node] = relationship(back_populates="allocations")


class AllocationInterval(Base):
    """One span of time during which a cluster held a set of nodes: the source of GPU-seconds.

    Opened when a cluster is placed; closed when it is deleted, preempted or has nodes swapped
    (a swap opens the next interval on the new nodes). Never deleted with the cluster, so usage
    over any past period can be summed.
    """

    __tablename__ = "allocation_intervals"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    cluster_id: Mapped[int] = mapped_column(index=True)  # no foreign key: outlives the cluster
    cluster_name: Mapped[str] = mapped_column(sa.String(64))
    owner: Mapped[str | None] = mapped_column(sa.String(128), index=True)
    gpu_type: Mapped[str] = mapped_column(sa.String(64))
    gpus: Mapped[int]
    nodes: Mapped[list] = mapped_column(sa.JSON)  # node names
    started_at: Mapped[float] = mapped_column(index=True)
    ended_at: Mapped[float | None] = mapped_column(index=True)
    end_reason: Mapped[str | None] = mapped_column(sa.String(32))  # deleted | preempted | held | nodes swapped


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = {"sqlite_autoincrement": True}  # an id is never given out twice, not even after a crash
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    cluster_name: Mapped[str] = mapped_column(sa.String(64), index=True)
    config: Mapped[str] = mapped_column(sa.Text)
    overrides: Mapped[list] = mapped_column(sa.JSON)  # ["section.key=value", ...]
    command: Mapped[list | None] = mapped_column(sa.JSON)  # argv run instead of training (a serving job)
    state: Mapped[str] = mapped_column(sa.String(16))
    job_dir: Mapped[str] = mapped_column(sa.Text)  # holds the log, the launch script and run/
    backend_ref: Mapped[str | None] = mapped_column(sa.String(128))  # Slurm job id or local pid
    restarts: Mapped[int] = mapped_column(default=0)
    max_restarts: Mapped[int]
    preemptions: Mapped[int] = mapped_column(default=0)  # times stopped to give its nodes to a higher priority
    exit_code: Mapped[int | None]
    cause: Mapped[dict | None] = mapped_column(sa.JSON)  # why a stopped job waits (as its cluster's), else None
    detail: Mapped[str | None] = mapped_column(sa.Text)
    submitted_at: Mapped[float]
    ended_at: Mapped[float | None]


class HealthResult(Base):
    __tablename__ = "health_results"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    node_name: Mapped[str] = mapped_column(sa.String(128), index=True)
    check_name: Mapped[str] = mapped_column(sa.String(64))
    value: Mapped[float | None]
    unit: Mapped[str | None] = mapped_column(sa.String(32))
    threshold: Mapped[float | None]
    status: Mapped[str] = mapped_column(sa.String(16))  # passed | failed | skipped
    detail: Mapped[str | None] = mapped_column(sa.Text)
    measured_at: Mapped[float]


def default_url() -> str:
    if os.environ.get("SUPERCLUSTER_DB"):
        return os.environ["SUPERCLUSTER_DB"]
    path = home() / "fleet.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


# Connections of one Database: up to POOL_SIZE kept open between uses, and as many more at once as
# POOL_OVERFLOW, for the service's up to 40 request threads (FastAPI's pool) and its own; a thread
# past that waits for one. (PostgreSQL counts them against its max_connections.)
POOL_SIZE, POOL_OVERFLOW = 10, 40
READ_ONLY = "supercluster_read_only"  # execution option of `Database.reading()`'s engine


def make_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        # timeout: a writer waits up to 60 s for another's lock instead of failing at once.
        # Pooled, not a connection per transaction: closing the last connection to a WAL database
        # checkpoints it (an fsync of the database file) and opening one reads the schema again,
        # which cost more than the transaction itself.
        engine = sa.create_engine(url, connect_args={"timeout": 60, "check_same_thread": False},
                                  poolclass=sa.pool.QueuePool, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW)

        @sa.event.listens_for(engine, "connect")
        def _no_implicit_transactions(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # let us issue BEGIN ourselves
            dbapi_conn.execute("PRAGMA foreign_keys=ON")
            # Write-ahead log, still synchronous=FULL: a commit is one fsync of the log instead of
            # the rollback journal's two or three, and stays durable. (Not for a network file
            # system; point $SUPERCLUSTER_DB at PostgreSQL there.)
            if url.removeprefix("sqlite://") not in ("", "/:memory:"):
                _write_ahead_log(dbapi_conn)
            dbapi_conn.execute("PRAGMA synchronous=FULL")

        @sa.event.listens_for(engine, "begin")
        def _begin_immediate(conn):
            # Take the write lock at BEGIN, not at the first write: a reader-then-writer
            # transaction can then never deadlock or act on a stale read. A read-only one
            # (`Database.reading`) reads its own snapshot of the log beside the writer instead.
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

    else:
        parsed = sa.make_url(url)
        if parsed.drivername == "postgresql":
            # SQLAlchemy 2.1 means psycopg (3) by a bare postgresql://; use psycopg2 when that is what is installed.
            import importlib.util

            if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
                parsed = parsed.set(drivername="postgresql+psycopg2")
        engine = sa.create_engine(parsed, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW)
    _fork_safe(engine)
    return engine


def _write_ahead_log(dbapi_conn, wait_s: float = 60.0) -> None:
    """Put a SQLite database in WAL mode (it stays so). Switching needs an exclusive lock, and when
    other connections switch the same fresh database at that moment SQLite answers "database is
    locked" at once, without waiting out its busy timeout (seen when several processes open a new
    fleet database together): retried here for as long as that timeout would have waited."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _fork_safe(engine: sa.Engine) -> None:
    """A forked child never uses a pooled connection of its parent (two processes on one
    connection corrupt it): the pool drops it and opens its own (SQLAlchemy's recipe)."""

    @sa.event.listens_for(engine, "connect")
    def _owner(_dbapi_conn, record):
        record.info["pid"] = os.getpid()

    @sa.event.listens_for(engine, "checkout")
    def _same_process(_dbapi_conn, record, proxy):
        if record.info.get("pid") != os.getpid():
            record.dbapi_connection = proxy.dbapi_connection = None
            raise sa.exc.DisconnectionError("connection opened by another process; opening a new one")


def _create_database_hint(url: str) -> str:
    """How to create the PostgreSQL database a URL names (the server does not create databases itself)."""
    parsed = sa.make_url(url)
    flags = "".join(f" {flag} {value}" for flag, value in (("-h", parsed.host), ("-p", parsed.port), ("-U", parsed.username)) if value)
    return (f"The PostgreSQL database {parsed.database!r} does not exist; create it with `createdb{flags} {parsed.database}` "
            f"(or `CREATE DATABASE {parsed.database}` in psql), then run the command again.")


class SQLiteWriters:
    """The writers of one SQLite database, one at a time, each going the moment the one before
    commits: threads of this process queue on a lock, processes (the server's workers) on an
    `flock` of a file beside the database (`<file>-writers`), which the kernel hands to the next
    waiter at once. SQLite's own lock makes a writer that finds it taken sleep and poll, up to
    100 ms a nap: under bench/service.py, two server workers on one file then kept 1.07 cores of
    two busy and their p99 went from 2.7 s (one worker) to 7.4 s. A process that does not queue
    here (an older version) still meets the others at SQLite's lock, as before."""

    def __init__(self, database: str | None):
        self._threads = threading.RLock()
        self._depth = 0  # re-entered by this thread: the file stays locked until the outermost exit
        self._path = f"{database}-writers" if database not in (None, "", ":memory:") else None  # in memory: one process
        self._fd: int | None = None
        self._pid: int | None = None
        self._close: weakref.finalize | None = None  # closes the file when this is collected or closed

    def __enter__(self) -> None:
        self._threads.acquire()
        try:
            if self._depth == 0 and self._path:
                fcntl.flock(self._file(), fcntl.LOCK_EX)  # blocks without the GIL
        except BaseException:
            self._threads.release()
            raise
        self._depth += 1

    def __exit__(self, *_exc) -> None:
        self._depth -= 1
        try:
            if self._depth == 0 and self._path:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def _file(self) -> int:
        # Opened in the process that locks it: a file opened before a fork is one open file in
        # both processes, and an flock held through it would admit both.
        if self._pid != os.getpid():
            self.close()  # in a forked child: its copy of the parent's file
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._pid = os.getpid()
            self._close = weakref.finalize(self, os.close, self._fd)
        return self._fd

    def close(self) -> None:
        """Closes the lock file (opened again by the next writer); not while this process writes."""
        if self._close is not None:
            self._close()
            self._close = self._fd = self._pid = None


class Database:
    """A fleet database at `url` (default: `default_url()`), migrated to the latest schema on open."""

    def __init__(self, url: str | None = None):
        self.url = url or default_url()
        try:
            self.engine = make_engine(self.url)
            migrations.upgrade(self.engine)
            self._reader = self.engine.execution_options(**{READ_ONLY: True})  # same pool
            sqlite = self.engine.dialect.name == "sqlite"
            self._writers = SQLiteWriters(self.engine.url.database) if sqlite else contextlib.nullcontext()
            # Rows that another part of the program has waiting to be committed, added to the next
            # write transaction of this process (`transaction`): a rider returns what to do once
            # that transaction has ended (committed or not), or None when it had nothing to add.
            self.riders: list[Callable[[Session], Callable[[bool], None] | None]] = []
        except ModuleNotFoundError as err:
            raise UserError(f"The database URL {self.url!r} needs the Python package {err.name!r}; pip install it.") from None
        except sa.exc.ArgumentError as err:
            raise UserError(f"Cannot use database URL {self.url!r} ({err}); pass a SQLAlchemy URL such as sqlite:///fleet.db.") from None
        except sa.exc.DatabaseError as err:  # unreachable, or a file that is no database ("file is not a database")
            reason = str(err.orig).strip().splitlines()[0] if err.orig else str(err)
            if "does not exist" in reason and sa.make_url(self.url).get_backend_name() == "postgresql":
                raise UserError(_create_database_hint(self.url)) from None
            raise UserError(f"Cannot open the fleet database {self.url!r} ({reason}); check --db or $SUPERCLUSTER_DB.") from None

    def writing(self) -> contextlib.AbstractContextManager:
        """This process's turn at the write lock (on SQLite; nothing on PostgreSQL, whose writers
        wait on rows), without a transaction: for a writer that may find, once its turn comes,
        that a rider took what it had to write. A `transaction` inside it re-enters the lock."""
        return self._writers

    @contextlib.contextmanager
    def transaction(self, lock: bool = True) -> Iterator[Session]:
        """A session in one transaction, committed on success and rolled back on any error.

        lock=True takes the fleet lock first, so that everything read inside is current until
        commit; every transaction on SQLite holds the write lock anyway (BEGIN IMMEDIATE).
        An effect outside the database made inside the transaction (a Slurm reservation, a
        submitted job) registers its undo with `on_rollback`: when the transaction does not
        commit (an error in our code or at COMMIT itself), the undos run, newest first, so
        nothing outside is left behind that our books do not know about.
        The riders' rows (`riders`) are added last, each in a savepoint of its own: a rider's row
        that fails is rolled back alone and never fails the transaction it rode in.
        """
        ended: list[Callable[[bool], None]] = []  # the riders', told after the session has let go of their rows
        try:
            with self._writers, Session(self.engine, expire_on_commit=False) as session:
                undo: list[Callable[[], None]] = []
                session.info[_UNDO] = undo
                try:
                    with session.begin():
                        if lock:  # the fleet row, locked (a no-op on SQLite) and kept for `fleet()`
                            # (held here: the session's identity map keeps only objects someone holds)
                            session.info[_FLEET] = session.execute(_LOCK_FLEET).scalar()
                        yield session
                        ended.extend(after for ride in self.riders if (after := ride(session)) is not None)
                except BaseException:
                    _run_undo(undo)
                    raise
        except BaseException:
            for after in ended:
                after(False)
            raise
        for after in ended:
            after(True)

    @contextlib.contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reads only: no fleet lock, and on SQLite no write lock either, so readers
        run beside each other and beside a writer (each on its own snapshot); anything it changes
        is rolled back. Objects read stay readable after it (closed, not expired)."""
        with Session(self._reader) as session:  # closing rolls back, and detaches what it loaded as loaded
            yield session

    def fleet(self, session: Session) -> Fleet:
        fleet = session.get(Fleet, 1)
        if fleet is None:
            raise UserError("No fleet yet; run `supercluster fleet init --backend local|slurm|sim` first.")
        return fleet

    def dispose(self) -> None:
        self.engine.dispose()
        if isinstance(self._writers, SQLiteWriters):
            self._writers.close()


_LOCK_FLEET = sa.select(Fleet).with_for_update()  # built once: every transaction runs it
_NAMED = sa.select(Cluster).where(Cluster.name == sa.bindparam("name"))
_UNDO = "supercluster_on_rollback"
_FLEET = "supercluster_fleet"


def on_rollback(session: Session, undo: Callable[[], None]) -> None:
    """Runs `undo` if the transaction of `session` (from `Database.transaction`) does not commit."""
    session.info[_UNDO].append(undo)


def _run_undo(undo: list[Callable[[], None]]) -> None:
    for action in reversed(undo):
        try:
            action()
        except Exception as err:  # the original error matters more; say what is left outside
            log.warning("could not undo an external effect after a rollback: %s", err)


def get_cluster(s: Session, name: str) -> Cluster:
    """The cluster named `name`; a UserError naming the closest name when there is none."""
    cluster = s.scalar(_NAMED, {"name": name})
    if cluster is None:
        names = s.scalars(sa.select(Cluster.name)).all()
        raise UserError(f"No cluster named {name!r}{closest(name, names)}; see `supercluster cluster list`.")
    return cluster


def open_db(db: Database | str | None = None) -> Database:
    """A Database from a Database (returned as is), a URL, or None for the default."""
    return db if isinstance(db, Database) else Database(db)


def now() -> float:
    return time.time()
