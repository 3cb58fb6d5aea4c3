"""The audit log's writer: the rows of calls made at the same time committed together.

Each call that changes something leaves a row, and one transaction per row cost a write lock and,
on SQLite, an fsync each, beside the call's own. Here one thread writes: a row waits in a queue,
and every row that arrives while a commit is being written goes into the next one.

The guarantee is the one a transaction per row gave: the gate holds a call's answer until its
row is committed (`record` returns a future that says so), so every answered call is in the log,
and a server stopped or killed loses only rows of calls not yet answered. `close` (at shutdown)
writes what is queued before it returns.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future, InvalidStateError

from supercluster.service.models import Audit
from supercluster.service.store import Store

log = logging.getLogger("supercluster.service")

BATCH = 500  # rows in one commit at most


class AuditLog:
    def __init__(self, store: Store):
        self.store = store
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def record(self, row: Audit) -> Future:
        """Queues `row`; the future is done once it is committed (or holds why it could not be)."""
        done: Future = Future()
        with self._lock:
            self._queue.put((row, done))
            if self._thread is None:  # started here, not at start-up: an app never started still writes
                self._thread = threading.Thread(target=self._run, daemon=True, name="audit-writer")
                self._thread.start()
        return done

    def close(self) -> None:
        """Writes every row queued so far, then stops the writer (a later `record` starts another)."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            self._queue.put(None)  # rows queued after this go to the next writer, in order
        thread.join()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < BATCH and batch[-1] is not None:  # never past the end: what follows is the next writer's
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = batch[-1] is None  # the writer's end
            if stop:
                batch.pop()
            self._write(batch)
            if stop:
                return

    def _write(self, batch: list[tuple[Audit, Future]]) -> None:
        if not batch:
            return
        try:
            # Ahead of this process's other writers: each call in the batch has done its own write
            # and waits for this one; behind them it waited out the writers' queue a second time.
            with self.store.session(ahead=True) as s:
                s.add_all([row for row, _ in batch])
        except Exception:  # one bad row must not fail the others: each alone, and each says how it went
            log.exception("audit batch of %d rows failed; writing them one by one", len(batch))
            for row, done in batch:
                try:
                    with self.store.session() as s:
                        s.add(Audit(**{c.key: getattr(row, c.key) for c in Audit.__table__.c if c.key != "id"}))
                except Exception as err:
                    _settle(done, err)
                else:
                    _settle(done)
            return
        for _, done in batch:
            _settle(done)


def _settle(done: Future, err: Exception | None = None) -> None:
    """Tells the waiting call; one that stopped waiting (cancelled) must not stop the writer."""
    if done.cancelled():
        return
    try:
        done.set_exception(err) if err is not None else done.set_result(None)
    except InvalidStateError:  # cancelled in between
        pass
