"""The audit log's writer (service/audit.py): rows queued while a commit is written go in one
commit together, every row is committed before its caller is told, one bad row fails only itself,
and closing writes everything queued. SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import Future

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


def test_rows_that_arrive_during_a_commit_share_the_next_one(store):
    log = AuditLog(store)
    release, batches, opened = threading.Event(), [], store.session

    @contextlib.contextmanager
    def counted_session(**how):
        with opened(**how) as s:
            yield s
            batches.append(len(s.new))
            if len(batches) == 1:
                release.wait(10)  # the first commit is slow: the others queue meanwhile

    store.session = counted_session
    first = log.record(_row(0))
    while not batches:
        time.sleep(0.001)
    rest = [log.record(_row(i)) for i in range(1, 20)]
    assert not any(f.done() for f in rest)  # nobody is told before their row is committed
    release.set()
    for f in [first, *rest]:
        f.result(timeout=10)
    assert batches == [1, 19]
    assert _paths(store) == [f"/v1/orgs/{i}" for i in range(20)]
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


def test_a_row_queued_after_a_writers_end_is_left_for_the_next_writer(store):
    """`close` ends a writer with a marker; a row queued behind it (a call arriving during the close)
    must not be taken into the ending writer's last batch, where it would be dropped and its caller
    never told. The next `record` starts a writer that commits it."""
    log = AuditLog(store)
    first = log.record(_row(1))
    log.close()
    log._queue.put(None)  # a writer's end, with a row behind it, as a close racing a call leaves them
    late = Future()
    log._queue.put((_row(2), late))
    log._run()  # a writer meeting the end: returns at once, leaving the row queued
    assert first.result(timeout=10) is None and not late.done()
    log.record(_row(3)).result(timeout=10)  # the next writer takes both, in order
    assert late.result(timeout=10) is None
    assert _paths(store) == ["/v1/orgs/1", "/v1/orgs/2", "/v1/orgs/3"]
    log.close()
