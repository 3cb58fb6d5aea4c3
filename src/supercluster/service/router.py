"""Which replica of an endpoint answers a call: the least busy, unless its prompt's prefix has a home.

Least outstanding requests: each call goes to the replica with the fewest calls this process has
sent it and not seen end. Prefix affinity: a prompt's first `AFFINITY_CHARS` characters pick one
replica by rendezvous (highest-random-weight) hashing, so prompts that share a prefix (a system
prompt, a few-shot preamble) land where the server's prefix cache already holds it, and a replica
added or removed moves only the prefixes that hashed to it. The affine replica is taken unless it
is more than `AFFINITY_SLACK` calls busier than the least busy one: a hot prefix must not pile a
queue on one replica while others idle.

The counts are this process's: a service of several workers routes each worker's calls by its own
counts (as its rate limits count per worker). The scaler reads load from the model servers themselves.
A replica that failed a call is avoided here for `AVOID_S` seconds, until the scaler replaces it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass

AFFINITY_CHARS = 256  # how long a prefix keys affinity (SUPERCLUSTER_AFFINITY_CHARS)
AFFINITY_SLACK = 4  # calls the affine replica may be busier than the least busy (SUPERCLUSTER_AFFINITY_SLACK)
AVOID_S = 10.0


@dataclass(frozen=True)
class Replica:
    index: int
    url: str


def prefix_key(payload: object, chars: int = AFFINITY_CHARS) -> str | None:
    """What a call's affinity is keyed on: its prompt's (or messages') first characters; None when it has none."""
    if not isinstance(payload, dict):
        return None
    if isinstance(payload.get("messages"), list):
        text = json.dumps(payload["messages"], sort_keys=True, ensure_ascii=False)
    elif payload.get("prompt") is not None:
        prompt = payload["prompt"]
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    else:
        return None
    return text[:chars] or None


def _weight(key: str, index: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{index}\x00{key}".encode(), digest_size=8).digest(), "big")


class Router:
    def __init__(self, slack: int | None = None, chars: int | None = None):
        env = os.environ.get
        self.slack = int(env("SUPERCLUSTER_AFFINITY_SLACK", AFFINITY_SLACK)) if slack is None else slack
        self.chars = int(env("SUPERCLUSTER_AFFINITY_CHARS", AFFINITY_CHARS)) if chars is None else chars
        self.lock = threading.Lock()
        self.outstanding: dict[tuple[int, int], int] = {}  # (endpoint id, replica index) -> calls in flight
        self.avoid_until: dict[tuple[int, int], float] = {}

    def pick(self, endpoint_id: int, replicas: list[Replica], key: str | None, exclude: set[int] = frozenset()) -> Replica | None:
        """The replica for one call (counted as outstanding until `done`), or None when none is left to try."""
        now = time.monotonic()
        with self.lock:
            choices = [r for r in replicas if r.index not in exclude]
            healthy = [r for r in choices if self.avoid_until.get((endpoint_id, r.index), 0) <= now]
            choices = healthy or choices  # all avoided: try them anyway rather than fail the call
            if not choices:
                return None
            load = {r.index: self.outstanding.get((endpoint_id, r.index), 0) for r in choices}
            least = min(choices, key=lambda r: (load[r.index], r.index))
            chosen = least
            if key is not None:
                affine = max(choices, key=lambda r: _weight(key, r.index))
                if load[affine.index] <= load[least.index] + self.slack:
                    chosen = affine
            slot = (endpoint_id, chosen.index)
            self.outstanding[slot] = self.outstanding.get(slot, 0) + 1
            return chosen

    def key(self, payload: object) -> str | None:
        return prefix_key(payload, self.chars)

    def done(self, endpoint_id: int, replica: Replica, failed: bool = False) -> None:
        with self.lock:
            slot = (endpoint_id, replica.index)
            self.outstanding[slot] = max(0, self.outstanding.get(slot, 0) - 1)
            if failed:
                self.avoid_until[slot] = time.monotonic() + AVOID_S
            else:
                self.avoid_until.pop(slot, None)

    def load(self, endpoint_id: int) -> dict[int, int]:
        with self.lock:
            return {i: n for (e, i), n in self.outstanding.items() if e == endpoint_id}
