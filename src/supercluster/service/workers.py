"""Serving the API from several processes over one database, on one port.

One Python process answers on one core at a time. Every fact lives in the database (PostgreSQL,
or SQLite in WAL), so any worker can answer any request; what a worker keeps for itself is only
a cache or a limit: recently checked tokens (a token revoked through another worker is honoured
there for at most `CallerCache.ttl_s`) and rate limits, which then count per worker. Only the
first worker runs the 5-second pass over budgets and queues.

Each worker listens on a socket of its own, bound to the same port with SO_REUSEPORT, so the
kernel spreads new connections evenly over them. Workers accepting from one shared socket did
not: a worker's event loop accepts up to its whole backlog at each wake-up, and of 200
connections opened at once one worker took 146 and the other 54, whose clients then waited
three times as long. (The first worker keeps the socket the command bound before starting, so
a connection made before the workers are up is not lost.)
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
import traceback

TICK_S = 5.0  # the server's own pass: budgets, then the queues
SWITCH_INTERVAL_S = 0.0005  # how long a thread may hold the GIL while another waits (see `_worker`)


def _worker(db: str | None, sock: socket.socket, tick: bool) -> None:
    import uvicorn

    from supercluster.service.app import create_app

    app = create_app(db, tick_s=TICK_S if tick else 0.0)  # its own engine: connections never cross a fork
    # Everything loaded by now (the libraries, the app) lives as long as the server. Frozen out of
    # the collector's sight, a full collection scans only what requests made: a few ms instead of
    # the 40-60 ms that were the slowest requests' tail. (Garbage first, so none is frozen with it.)
    gc.collect()
    gc.freeze()
    # A thread holding the database's write lock gives up the GIL at every SQLite call and must
    # win it back from the request threads reading beside it, each of which may keep it for the
    # whole switch interval (5 ms by default): under bench/service.py a create held the lock
    # 13 ms, 5 ms without the readers. At 0.5 ms it held it 7 ms, and every other writer, of every
    # worker, waits that much less.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def _beside(sock: socket.socket) -> socket.socket:
    """A listening socket of this worker's own on `sock`'s port (where `sock` allows SO_REUSEPORT;
    else `sock` itself, shared, as accepting from one socket does)."""
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
        return sock
    own = socket.socket(sock.family, sock.type)
    own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    own.bind(sock.getsockname())
    own.listen(2048)
    sock.close()  # the first worker's
    return own


def serve(db: str | None, sock: socket.socket, workers: int = 1) -> int:
    """Answers on `sock` until stopped; returns the exit status."""
    if workers == 1:
        _worker(db, sock, tick=True)
        return 0
    children = []
    for i in range(workers):
        pid = os.fork()
        if pid == 0:  # a worker: serve, and never return into the parent's code
            code = 0
            try:
                _worker(db, sock if i == 0 else _beside(sock), tick=i == 0)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        children.append(pid)
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
        sock.close()  # the first worker's now: connections waiting on it are its to answer

    def stop(*_):
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)  # uvicorn's graceful shutdown
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # ^C reaches the workers too; they stop on their own
    _, status = os.wait()  # one worker ended (stopped, or failed): the server is stopped whole
    stop()
    for child in children:
        try:
            os.waitpid(child, 0)
        except ChildProcessError:
            pass
    code = os.waitstatus_to_exitcode(status)
    # uvicorn ends a worker it stopped gracefully by raising the signal again: that is a clean stop
    return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else (code if code > 0 else 128 - code)
