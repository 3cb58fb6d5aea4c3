"""The audit log's writer: the rows of calls made at the same time committed together, in the
write transactions that the service makes anyway where it can.

Each call that changes something leaves a row, and a transaction of its own per row cost a turn at
the write lock and, on SQLite, a commit each, beside the call's own. So a row waits in a queue, and
rides along in the next write transaction of this process (`Database.riders`): under load, the one
the next create or delete makes. Behind every other writer in line, a thread of this log takes its
turn too, for the rows no other writer took by then (an idle server's, a lone call's), and commits
them itself: with no writer ahead a row is written at once, and under load the turn mostly comes
with nothing left to write. Under bench/service.py its own commits had held the lock 4 ms of every
13 that a write cost.

The guarantee is the one a transaction per row gave: the gate holds a call's answer until its row
is committed (`record` returns a future that says so), so every answered call is in the log, and a
server stopped or killed loses only rows of calls not yet answered. `close` (at shutdown) writes
what is queued before it returns.
"""

from __future__ import annotations

import collections
import logging
import threading
from concurrent.futures import Future, InvalidStateError
from typing import Callable

from sqlalchemy.orm import Session

from supercluster.service.models import Audit
from supercluster.service.store import Store

log = logging.getLogger("supercluster.service")

BATCH = 500  # rows in one commit at most


class AuditLog:
    def __init__(self, store: Store):
        self.store = store
        self._rows: collections.deque[tuple[Audit, Future]] = collections.deque()
        self._changed = threading.Condition()  # guards `_rows`, `_thread` and `_closing`
        self._thread: threading.Thread | None = None
        self._closing = False
        store.fleet.riders.append(self._ride)

    def record(self, row: Audit) -> Future:
        """Queues `row`; the future is done once it is committed (or holds why it could not be)."""
        done: Future = Future()
        self._queue([(row, done)])
        return done

    def close(self) -> None:
        """Writes every row queued so far, then stops the writer (a later `record` starts another)."""
        with self._changed:
            thread = self._thread
            if thread is None:
                return
            self._closing = True
            self._changed.notify_all()
        thread.join()

    def _queue(self, batch: list[tuple[Audit, Future]], first: bool = False) -> None:
        """Adds rows to the queue (`first`: at its head, rows a transaction took and did not commit)."""
        with self._changed:
            self._rows.extendleft(reversed(batch)) if first else self._rows.extend(batch)
            if self._thread is None:  # started here, not at start-up: an app never started still writes
                self._thread = threading.Thread(target=self._run, daemon=True, name="audit-writer")
                self._thread.start()
            self._changed.notify_all()

    def _take(self) -> list[tuple[Audit, Future]]:
        with self._changed:
            return [self._rows.popleft() for _ in range(min(BATCH, len(self._rows)))]

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._rows and not self._closing:
                    self._changed.wait()
                if not self._rows:  # closing, and every row is written
                    self._thread, self._closing = None, False
                    return
            with self.store.fleet.writing():  # in line behind this process's writers, who may take the rows first
                self._write(self._take())

    def _ride(self, s: Session) -> Callable[[bool], None] | None:
        """Adds the queued rows to another writer's transaction, in a savepoint (a row that fails
        there is left to this log's own writer, and never fails the transaction it rode in)."""
        batch = self._take()
        if not batch:
            return None
        try:
            with s.begin_nested():
                s.add_all([row for row, _ in batch])
        except Exception:
            self._queue([(_fresh(row), done) for row, done in batch], first=True)
            return None

        def ended(committed: bool) -> None:
            if committed:
                for _, done in batch:
                    _settle(done)
            else:  # the transaction failed (its own work, or its commit): the rows go back, first in line
                self._queue([(_fresh(row), done) for row, done in batch], first=True)

        return ended

    def _write(self, batch: list[tuple[Audit, Future]]) -> None:
        if not batch:
            return
        try:
            with self.store.session() as s:
                s.add_all([row for row, _ in batch])
        except Exception:  # one bad row must not fail the others: each alone, and each says how it went
            log.exception("audit batch of %d rows failed; writing them one by one", len(batch))
            for row, done in batch:
                try:
                    with self.store.session() as s:
                        s.add(_fresh(row))
                except Exception as err:
                    _settle(done, err)
                else:
                    _settle(done)
            return
        for _, done in batch:
            _settle(done)


def _fresh(row: Audit) -> Audit:
    """A new object with `row`'s values: one that a failed transaction held may not be added again."""
    return Audit(**{c.key: getattr(row, c.key) for c in Audit.__table__.c if c.key != "id"})


def _settle(done: Future, err: Exception | None = None) -> None:
    """Tells the waiting call; one that stopped waiting (cancelled) must not stop the writer."""
    if done.cancelled():
        return
    try:
        done.set_exception(err) if err is not None else done.set_result(None)
    except InvalidStateError:  # cancelled in between
        pass
