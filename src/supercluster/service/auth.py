"""Who is calling: bearer tokens (hashed at rest), roles, and per-token rate limits.

A token is 32 random bytes, so one SHA-256 is enough to store it (a slow password hash guards
guessable secrets; these are not guessable), and lookup stays one indexed query per request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import threading
import time
from collections.abc import Hashable

import sqlalchemy as sa
from sqlalchemy.orm import Session

from supercluster.service.models import ROLES, Project, Token, User

TOKEN_PREFIX = "sct_"


class ServiceError(Exception):
    """An HTTP answer other than success: a status and one sentence."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def rank(role: str) -> int:
    return ROLES.index(role)


@dataclasses.dataclass(frozen=True)
class Caller:
    """The authenticated caller of one request."""

    user_id: int
    user: str
    token_id: int
    role: str
    project_id: int | None  # None only for the operator
    project: str | None
    org_id: int | None
    is_operator: bool
    # The token's project as its row says (None for the operator): a project is never renamed,
    # moved or deleted, so a request on the caller's own project needs no read of it (`visible_project`).
    project_org_id: int | None = None
    project_created_at: float | None = None

    def at_least(self, role: str) -> bool:
        return self.is_operator or rank(self.role) >= rank(role)


def bearer_hash(header: str | None) -> str:
    """The stored hash of the header's bearer token; 401 when there is none."""
    if not header:
        raise ServiceError(401, "This route needs a token; send it as 'Authorization: Bearer <token>'.",
                           {"WWW-Authenticate": "Bearer"})
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ServiceError(401, "The Authorization header must be 'Bearer <token>'.", {"WWW-Authenticate": "Bearer"})
    return hash_token(token.strip())


def authenticate_hash(s: Session, token_hash: str) -> tuple[Caller, float | None]:
    """The caller holding the token with this hash, and when the token expires."""
    row = s.scalar(sa.select(Token).where(Token.token_hash == token_hash))
    if row is None:
        raise ServiceError(401, "This token is not known; log in again with a valid token.", {"WWW-Authenticate": "Bearer"})
    if row.revoked_at is not None:
        raise ServiceError(401, "This token was revoked; ask your project admin for a new one.", {"WWW-Authenticate": "Bearer"})
    if row.expires_at is not None and row.expires_at <= time.time():
        raise ServiceError(401, "This token has expired; ask your project admin for a new one.", {"WWW-Authenticate": "Bearer"})
    user = s.get(User, row.user_id)
    project = s.get(Project, row.project_id) if row.project_id is not None else None
    return Caller(user_id=user.id, user=user.name, token_id=row.id, role=row.role, project_id=row.project_id,
                  project=project.name if project else None, org_id=user.org_id,
                  is_operator=user.is_operator and row.project_id is None,
                  project_org_id=project.org_id if project else None,
                  project_created_at=project.created_at if project else None), row.expires_at


class CallerCache:
    """Callers of recently checked tokens, for `ttl_s` seconds: every request authenticates, and
    the three reads it takes were a tenth of the server's work under load.

    A token revoked through this server is dropped at once (`forget`); revoked through another
    server on the same database, it keeps working here for at most `ttl_s`. Expiry is checked on
    every hit, and unknown or refused tokens are never kept.
    """

    def __init__(self, ttl_s: float = 30.0, size: int = 10_000):
        self.ttl_s, self.size = ttl_s, size
        self._entries: dict[str, tuple[Caller, float | None, float]] = {}  # hash -> caller, expires_at, kept until
        self._lock = threading.Lock()
        self.generation = 0  # counts `forget`s: a lookup that began before one is not kept

    def get(self, token_hash: str) -> Caller | None:
        with self._lock:
            entry = self._entries.get(token_hash)
        if entry is None:
            return None
        caller, expires_at, until = entry
        now = time.time()
        if now >= until or (expires_at is not None and expires_at <= now):
            return None  # looked up again, which also says why it is refused
        return caller

    def put(self, token_hash: str, caller: Caller, expires_at: float | None, generation: int) -> None:
        """Keeps what a lookup begun at `generation` found (nothing, if a token was revoked since)."""
        with self._lock:
            if generation != self.generation:
                return
            if len(self._entries) >= self.size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[token_hash] = (caller, expires_at, time.time() + self.ttl_s)

    def forget(self) -> None:
        with self._lock:
            self._entries.clear()
            self.generation += 1


class RateLimiter:
    """A token bucket per key (an API token's id, a client's address): `rate` requests a second on
    average, bursts up to `burst`."""

    def __init__(self, rate: float, burst: int, what: str = "this token"):
        self.rate, self.burst, self.what = rate, burst, what
        self._buckets: dict[Hashable, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, key: Hashable, spend: bool = True) -> None:
        """Takes one request from `key`'s bucket (with spend=False, only checks that one is left); 429 when empty."""
        now = time.monotonic()
        with self._lock:
            level, last = self._buckets.get(key, (float(self.burst), now))
            level = min(float(self.burst), level + (now - last) * self.rate)
            if level < 1.0:
                self._buckets[key] = (level, now)
                wait = (1.0 - level) / self.rate
                raise ServiceError(429, f"Too many requests for {self.what}; retry in {wait:.1f} s.",
                                   {"Retry-After": str(max(1, round(wait)))})
            if len(self._buckets) >= 100_000 and key not in self._buckets:  # addresses are many: forget full ones
                self._buckets = {k: v for k, v in self._buckets.items() if v[0] + (now - v[1]) * self.rate < self.burst}
            self._buckets[key] = (level - 1.0 if spend else level, now)
