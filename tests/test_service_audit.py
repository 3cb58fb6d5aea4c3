"""The audit log's writer (service/audit.py): rows queued while a commit is written go in one
commit together, every row is committed before its caller is told, one bad row fails only itself,
and closing writes everything queued. SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import sqlalchemy as sa

from supercluster.service.audit import AuditLog
from supercluster.service.models import Audit
from supercluster.service.store import Store


def _row(i: int, **changes) -> Audit:
    return Audit(**{"at": time.time(), "method": "POST", "path": f"/v1/orgs/{i}", "status": 201, **changes})


def _paths(store: Store) -> list[str]:
    with store.reading() as s:
        return list(s.scalars(sa.select(Audit.path).order_by(Audit.id)))


@pytest.fixture
def store(service_url):
    store = Store(service_url)
    yield store
    store.dispose()


def test_rows_that_arrive_during_a_commit_share_it_or_the_next_one(store):
    log = AuditLog(store)
    release, opened, sessions = threading.Event(), store.session, []

    @contextlib.contextmanager
    def counted_session(**how):
        sessions.append(1)
        with opened(**how) as s:
            yield s
            if len(sessions) == 1:
                release.wait(10)  # the first commit is slow: the others queue meanwhile

    store.session = counted_session
    first = log.record(_row(0))
    while not sessions:
        time.sleep(0.001)
    rest = [log.record(_row(i)) for i in range(1, 20)]
    assert not any(f.done() for f in rest)  # nobody is told before their row is committed
    release.set()
    for f in [first, *rest]:
        f.result(timeout=10)
    assert len(sessions) <= 2  # the 19 rode in the first commit, or went together in the next
    assert _paths(store) == [f"/v1/orgs/{i}" for i in range(20)]
    log.close()


@pytest.mark.parametrize("fails", [False, True], ids=["committed", "rolled-back"])
def test_a_row_rides_in_the_next_write_transaction_and_comes_back_when_it_fails(store, fails):
    """A row recorded while another writer of the process holds the lock commits with that
    writer's transaction (the log's own turn then finds nothing to write); a transaction that
    fails hands the row back, and the log writes it itself."""
    log = AuditLog(store)
    opened, own = store.session, []

    @contextlib.contextmanager
    def log_session(**how):  # the log's own transactions, counted (the test's own goes through `opened`)
        own.append(threading.current_thread().name)
        with opened(**how) as s:
            yield s

    store.session = log_session
    with contextlib.suppress(RuntimeError), opened() as s:
        done = log.record(_row(1))
        s.add(_row(0))
        time.sleep(0.05)  # the log's writer waits for its turn meanwhile (on PostgreSQL it may write at once)
        if fails:
            raise RuntimeError("the writer's own work failed")
    done.result(timeout=10)
    assert sorted(_paths(store)) == (["/v1/orgs/1"] if fails else ["/v1/orgs/0", "/v1/orgs/1"])
    log.close()
    if fails:
        assert own  # written by the log itself
    elif store.fleet.engine.dialect.name == "sqlite":
        assert own == []  # it rode along; the log's turn came with nothing to write


def test_a_bad_row_fails_alone_and_never_the_transaction_it_rides_in(store):
    log = AuditLog(store)
    with store.session() as s:
        futures = [log.record(_row(1)), log.record(_row(2, status=None)), log.record(_row(3))]  # status is NOT NULL
        s.add(_row(0))
        time.sleep(0.05)
    assert futures[0].result(timeout=10) is None and futures[2].result(timeout=10) is None
    with pytest.raises(sa.exc.IntegrityError):
        futures[1].result(timeout=10)
    assert sorted(_paths(store)) == ["/v1/orgs/0", "/v1/orgs/1", "/v1/orgs/3"]
    log.close()


def test_a_bad_row_fails_alone(store):
    log = AuditLog(store)
    entered, release, opened = threading.Event(), threading.Event(), store.session

    @contextlib.contextmanager
    def held_session():
        entered.set()
        release.wait(10)  # the writer is busy: the next rows queue, and go in one batch
        with opened() as s:
            yield s

    store.session = held_session
    log.record(_row(0))
    assert entered.wait(10)
    futures = [log.record(_row(1)), log.record(_row(2, status=None)), log.record(_row(3))]  # status is NOT NULL
    release.set()
    assert futures[0].result(timeout=10) is None and futures[2].result(timeout=10) is None
    with pytest.raises(sa.exc.IntegrityError):
        futures[1].result(timeout=10)
    assert _paths(store) == ["/v1/orgs/0", "/v1/orgs/1", "/v1/orgs/3"]
    log.close()


def test_close_writes_everything_queued_and_a_later_row_starts_a_new_writer(store):
    log = AuditLog(store)
    futures = [log.record(_row(i)) for i in range(50)]
    log.close()
    assert all(f.done() and f.exception() is None for f in futures)
    assert len(_paths(store)) == 50
    log.record(_row(50)).result(timeout=10)
    log.close()
    assert len(_paths(store)) == 51


def test_a_row_recorded_while_the_log_closes_is_written(store):
    """`close` writes what is queued, also a row that arrives while it does (a call answered during
    the shutdown), and a row after it starts a new writer."""
    log = AuditLog(store)
    release, opened = threading.Event(), store.session

    @contextlib.contextmanager
    def held_session(**how):
        release.wait(10)  # the writer is busy while `close` is called
        with opened(**how) as s:
            yield s

    store.session = held_session
    first = log.record(_row(1))
    closing = threading.Thread(target=log.close)
    closing.start()
    late = log.record(_row(2))
    release.set()
    closing.join(10)
    assert first.result(timeout=10) is None and late.result(timeout=10) is None
    store.session = opened
    log.record(_row(3)).result(timeout=10)
    assert _paths(store) == ["/v1/orgs/1", "/v1/orgs/2", "/v1/orgs/3"]
    log.close()
