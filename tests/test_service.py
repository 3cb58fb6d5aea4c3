"""The multi-tenant service through its HTTP API (FastAPI's TestClient, the real app and database):
tenancy and roles over every route, tokens, audit, quotas, bad input, rate limits. Each test runs
on SQLite and on the PostgreSQL server (a private schema), which CI must provide."""

import time

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from supercluster.cluster.fleet import init_fleet
from supercluster.service import tenancy
from supercluster.service.app import create_app
from supercluster.service.models import Audit, ServiceBase, Token
from supercluster.service.store import Store

SPEC = {"gpu_type": "h100", "nodes": 16, "gpus_per_node": 8, "nodes_per_leaf": 4, "leaves_per_pod": 2}


class World:
    """Two tenants: org acme (project llm) and org globex (project web), a token per role in each."""

    def __init__(self, url: str, **app_options):
        self.store = Store(url)
        with self.store.session() as s:
            self.op_token = tenancy.init_operator(s)
        init_fleet(self.store.fleet, "sim", spec=SPEC)
        self.client = TestClient(create_app(store=self.store, **app_options))
        self.op = self.auth(self.op_token)
        self.tokens = {}
        for org, project in (("acme", "llm"), ("globex", "web")):
            self.ok("POST", "/v1/orgs", self.op, {"name": org})
            self.ok("POST", f"/v1/orgs/{org}/projects", self.op, {"name": project})
            for role in ("admin", "member", "viewer"):
                user = f"{project}-{role}"
                self.ok("POST", "/v1/users", self.op, {"name": user, "org": org})
                body = self.ok("POST", "/v1/tokens", self.op, {"user": user, "project": project, "role": role})
                self.tokens[project, role] = self.auth(body["token"])

    @staticmethod
    def auth(token: str) -> dict:
        return {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, headers: dict | None, body=None):
        return self.client.request(method, path, headers=headers or {}, json=body)

    def ok(self, method, path, headers, body=None):
        r = self.call(method, path, headers, body)
        assert r.status_code < 300, (method, path, r.status_code, r.text)
        return r.json()

    def audit_count(self) -> int:
        with self.store.session() as s:
            return s.scalar(sa.select(sa.func.count()).select_from(Audit))

    def close(self):
        self.client.close()
        self.store.dispose()


@pytest.fixture
def world(service_url):
    w = World(service_url)
    yield w
    w.close()


def test_schema_migrates_with_alembic_and_init_prints_one_token(world, service_url):
    assert world.store.revision == "0006"
    inspector = sa.inspect(world.store.fleet.engine)
    for table in ServiceBase.metadata.sorted_tables:  # the migration and the models agree
        assert {c["name"] for c in inspector.get_columns(table.name)} == {c.name for c in table.columns}, table.name
    assert Store(service_url).revision == "0006"  # reopening applies nothing
    with world.store.session() as s:
        hashes = s.scalars(sa.select(Token.token_hash)).all()
    assert world.op_token not in hashes and len(hashes) == 7  # stored hashed only
    with pytest.raises(Exception, match="already initialized"), world.store.session() as s:
        tenancy.init_operator(s)
    assert world.client.get("/docs").status_code == 200
    assert "/v1/projects/{project}/clusters" in world.client.get("/openapi.json").json()["paths"]


# Every project-scoped route, the least role it needs, and a body that would succeed.
PROJECT_ROUTES = [
    ("GET", "/v1/projects/{p}/clusters", None, "viewer"),
    ("POST", "/v1/projects/{p}/clusters", {"name": "new", "gpus": 8}, "member"),
    ("GET", "/v1/projects/{p}/clusters/base", None, "viewer"),
    ("DELETE", "/v1/projects/{p}/clusters/base", None, "member"),
    ("GET", "/v1/projects/{p}/jobs", None, "viewer"),
    ("GET", "/v1/projects/{p}/quota", None, "viewer"),
    ("PUT", "/v1/projects/{p}/quota", {"gpu_type": "h100", "max_gpus": 64}, "operator"),
    ("GET", "/v1/projects/{p}/endpoints", None, "viewer"),
    # with a status: what the allowed roles get where this world cannot succeed (no model in the
    # library; no endpoint to call), still apart from the 403 of too low a role
    ("POST", "/v1/projects/{p}/endpoints", {"name": "e", "cluster": "base", "run_dir": "m"}, "member", 422),
    ("GET", "/v1/projects/{p}/endpoints/e", None, "viewer", 404),
    ("DELETE", "/v1/projects/{p}/endpoints/e", None, "member", 404),
    ("POST", "/v1/projects/{p}/endpoints/e/v1/completions", {"prompt": "x"}, "member", 404),
]
ROLES = ("admin", "member", "viewer")


def test_every_route_every_role_every_tenant(world):
    for project in ("llm", "web"):
        world.ok("POST", f"/v1/projects/{project}/clusters", world.tokens[project, "admin"], {"name": "base", "gpus": 8})
    for method, template, body, need, *status in PROJECT_ROUTES:
        for role in ROLES:
            # another tenant's project: never data, never a change
            r = world.call(method, template.format(p="web"), world.tokens["llm", role], body)
            assert r.status_code in (403, 404), (method, template, role, r.text)
            assert "base" not in r.text and "sim0" not in r.text
            # the caller's own project: allowed from the needed role up
            allowed = need != "operator" and ROLES.index(role) <= ROLES.index(need)
            r = world.call(method, template.format(p="llm"), world.tokens["llm", role], body)
            succeeded = r.status_code == status[0] if status else r.status_code < 300
            assert succeeded == allowed, (method, template, role, r.status_code, r.text)
            if allowed and not status and method == "POST":  # put the world back for the next role
                world.ok("DELETE", "/v1/projects/llm/clusters/new", world.tokens["llm", "admin"])
            if allowed and not status and method == "DELETE":
                world.ok("POST", "/v1/projects/llm/clusters", world.tokens["llm", "admin"], {"name": "base", "gpus": 8})
    # web's cluster survived every attempt from llm
    assert world.ok("GET", "/v1/projects/web/clusters/base", world.tokens["web", "viewer"])["state"] == "ready"

    # tenancy routes: each token sees its own org, project, users and tokens only
    for role in ROLES:
        h = world.tokens["llm", role]
        assert [o["name"] for o in world.ok("GET", "/v1/orgs", h)] == ["acme"]
        assert world.call("GET", "/v1/orgs/globex", h).status_code == 404
        assert world.call("GET", "/v1/orgs/globex/projects", h).status_code == 404
        assert [p["name"] for p in world.ok("GET", "/v1/orgs/acme/projects", h)] == ["llm"]
        users = {u["name"] for u in world.ok("GET", "/v1/users", h)}
        assert users <= {"llm-admin", "llm-member", "llm-viewer"} and users
        assert {t["project"] for t in world.ok("GET", "/v1/tokens", h)} == {"llm"}
        assert world.call("POST", "/v1/orgs", h, {"name": f"x{role}"}).status_code == 403
        assert world.call("POST", "/v1/orgs/acme/projects", h, {"name": f"x{role}"}).status_code == 403
        assert world.call("POST", "/v1/tokens", h, {"user": "web-viewer", "project": "web"}).status_code == 404
        assert world.call("POST", "/v1/users", h, {"name": f"x{role}", "org": "globex"}).status_code in (403, 404)
        audit = world.call("GET", "/v1/audit", h)
        assert audit.status_code == (200 if role == "admin" else 403)
        if role == "admin":
            assert {a["token_id"] for a in audit.json()} <= {t["id"] for t in world.ok("GET", "/v1/tokens", h)}
        fleet = world.ok("GET", "/v1/fleet", h)
        assert {c for n in fleet["node_list"] for c in n["clusters"]} == {"base"}  # web's cluster stays unnamed
        usage = world.ok("GET", "/v1/usage", h)["rows"]
        assert {r["project"] for r in usage} == {"llm"}
    # a token for another tenant's token id cannot revoke it
    web_ids = [t["id"] for t in world.ok("GET", "/v1/tokens", world.tokens["web", "admin"])]
    for tid in web_ids:
        assert world.call("DELETE", f"/v1/tokens/{tid}", world.tokens["llm", "admin"]).status_code == 404
    # roles: an admin grants at most admin in its own project; a member grants nothing
    assert world.call("POST", "/v1/tokens", world.tokens["llm", "member"], {"user": "llm-viewer", "project": "llm"}).status_code == 403
    granted = world.ok("POST", "/v1/tokens", world.tokens["llm", "admin"], {"user": "llm-viewer", "project": "llm"})
    assert granted["role"] == "viewer"  # least privilege by default


def test_revoked_and_expired_tokens_get_401(world):
    body = world.ok("POST", "/v1/tokens", world.tokens["llm", "admin"], {"user": "llm-member", "project": "llm", "role": "member"})
    h = world.auth(body["token"])
    assert world.call("GET", "/v1/projects/llm/clusters", h).status_code == 200
    world.ok("DELETE", f"/v1/tokens/{body['id']}", world.tokens["llm", "admin"])
    r = world.call("GET", "/v1/projects/llm/clusters", h)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    short = world.ok("POST", "/v1/tokens", world.op, {"user": "llm-member", "project": "llm", "days": 1})
    with world.store.session() as s:  # a day passes
        s.get(Token, short["id"]).expires_at = time.time() - 1
    r = world.call("GET", "/v1/projects/llm/clusters", world.auth(short["token"]))
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    for header in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        assert world.client.get("/v1/fleet", headers=header).status_code == 401


def test_every_mutating_call_leaves_an_audit_row(world):
    h = world.tokens["llm", "member"]
    calls = [
        ("POST", "/v1/projects/llm/clusters", h, {"name": "a", "gpus": 8}),
        ("POST", "/v1/projects/llm/clusters", h, {"name": "a", "gpus": 8}),  # refused: still audited
        ("DELETE", "/v1/projects/llm/clusters/a", h, None),
        ("PUT", "/v1/projects/llm/quota", world.op, {"gpu_type": "h100", "max_gpus": 8}),
        ("POST", "/v1/orgs", None, {"name": "anon"}),  # no token: audited with no user
        ("POST", "/v1/plans", h, {"model": "tiny", "gpus": 8}),
    ]
    for method, path, headers, body in calls:
        before = world.audit_count()
        status = world.call(method, path, headers, body).status_code
        with world.store.session() as s:
            rows = s.scalars(sa.select(Audit).order_by(Audit.id.desc()).limit(1)).all()
        assert world.audit_count() == before + 1, (method, path)
        assert (rows[0].method, rows[0].path, rows[0].status) == (method, path, status)
        assert rows[0].client and rows[0].at > time.time() - 60
        assert (rows[0].user_id is None) == (headers is None)
    before = world.audit_count()
    world.ok("GET", "/v1/projects/llm/clusters", h)  # reads are not audited
    assert world.audit_count() == before


def test_quota_queues_with_reason_then_starts_and_budget_refuses(world):
    member, op = world.tokens["llm", "member"], world.op
    world.ok("PUT", "/v1/projects/llm/quota", op, {"gpu_type": "h100", "max_gpus": 16})
    assert world.ok("POST", "/v1/projects/llm/clusters", member, {"name": "a", "gpus": 16})["state"] == "ready"
    waiting = world.ok("POST", "/v1/projects/llm/clusters", member, {"name": "b", "gpus": 8})
    assert waiting["state"] == "waiting" and "16 of 16 h100 GPUs in use" in waiting["reason"] and not waiting["nodes"]
    r = world.call("POST", "/v1/projects/llm/clusters", member, {"name": "c", "gpus": 24})
    assert r.status_code == 403 and "quota of 16" in r.json()["detail"]
    quota = world.ok("GET", "/v1/projects/llm/quota", member)["quotas"][0]
    assert quota["used_gpus"] == 16 and quota["max_gpus"] == 16
    # a quota below what the project holds is refused, nothing changed
    r = world.call("PUT", "/v1/projects/llm/quota", op, {"gpu_type": "h100", "max_gpus": 8})
    assert r.status_code == 409 and world.ok("GET", "/v1/projects/llm/quota", member)["quotas"][0]["max_gpus"] == 16
    # the other tenant is not held by llm's quota
    assert world.ok("POST", "/v1/projects/web/clusters", world.tokens["web", "member"], {"name": "w", "gpus": 32})["state"] == "ready"
    world.ok("DELETE", "/v1/projects/llm/clusters/a", member)
    b = world.ok("GET", "/v1/projects/llm/clusters/b", member)
    assert b["state"] == "ready" and len(b["nodes"]) == 1 and b["reason"] is None
    world.ok("DELETE", "/v1/projects/llm/clusters/b", member)
    # budget: the GPU-hours already spent (nothing runs now, so they stay put) are the whole budget
    spent = world.ok("GET", "/v1/projects/llm/quota", member)["quotas"][0]["used_gpu_hours"]
    assert spent > 0
    r = world.call("PUT", "/v1/projects/llm/quota", op, {"gpu_type": "h100", "max_gpus": 16, "gpu_hours": spent / 2})
    assert r.status_code == 409 and "already used" in r.json()["detail"]
    world.ok("PUT", "/v1/projects/llm/quota", op, {"gpu_type": "h100", "max_gpus": 16, "gpu_hours": spent})
    r = world.call("POST", "/v1/projects/llm/clusters", member, {"name": "d", "gpus": 8})
    assert r.status_code == 403 and "budget" in r.json()["detail"]
    assert world.ok("GET", "/v1/projects/llm/clusters", member) == []
    # usage: GPU-seconds from the two intervals, priced from the table
    rows = world.ok("GET", "/v1/usage?by=user", member)["rows"]
    assert [(r["project"], r["user"]) for r in rows] == [("llm", "llm-member")]
    assert rows[0]["gpu_hours"] == pytest.approx(spent, rel=1e-3, abs=1e-6)
    assert rows[0]["cost_usd"] == pytest.approx(rows[0]["gpu_hours"] * 98.32 / 8, rel=1e-3, abs=1e-4)
    csv = world.client.get("/v1/usage?format=csv", headers=member).text.splitlines()
    assert csv[0].startswith("org,project,user,gpu_type,gpu_seconds") and csv[1].startswith("acme,llm,,h100,")
    by_org = world.ok("GET", "/v1/usage?by=org", op)["rows"]
    assert {r["org"] for r in by_org} == {"acme", "globex"} and all(r["project"] is None for r in by_org)


BAD = [
    ({"name": "x", "gpus": 8, "color": "red"}, 422, "color"),
    ({"name": "x"}, 422, "gpus"),
    ({"name": "x", "gpus": 12}, 422, "multiple of 8"),
    ({"name": "x", "gpus": 4096}, 422, "more than the fleet"),
    ({"name": "x", "gpus": 8, "gpu_type": "tpu9"}, 422, ""),
    ({"name": "bad name", "gpus": 8}, 422, "name"),
    ({"name": "base", "gpus": 8}, 409, "already has a cluster"),
]


def test_bad_input_answers_one_sentence_and_changes_nothing(world):
    h = world.tokens["llm", "member"]
    world.ok("POST", "/v1/projects/llm/clusters", h, {"name": "base", "gpus": 8})
    before = world.ok("GET", "/v1/projects/llm/clusters", h)
    for body, status, words in BAD:
        r = world.call("POST", "/v1/projects/llm/clusters", h, body)
        assert r.status_code == status, (body, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, str) and words in detail and detail.endswith((".", "?)", ")."))
    r = world.client.post("/v1/projects/llm/clusters", headers={**h, "Content-Type": "application/json"}, content=b"{not json")
    assert r.status_code == 422 and isinstance(r.json()["detail"], str)
    assert world.ok("GET", "/v1/projects/llm/clusters", h) == before
    # the same name in another project is another cluster (names are per project)
    world.ok("POST", "/v1/projects/web/clusters", world.tokens["web", "member"], {"name": "base", "gpus": 8})


def test_rate_limit_per_token(service_url):
    w = World(service_url, rate=0.01, burst=30)  # the world's setup spends some of the operator's burst
    try:
        h = w.tokens["llm", "viewer"]
        codes = [w.call("GET", "/v1/projects/llm/quota", h).status_code for _ in range(32)]
        assert codes[:30] == [200] * 30 and codes[30:] == [429, 429]
        assert w.call("GET", "/v1/projects/llm/quota", w.tokens["llm", "admin"]).status_code == 200  # per token
    finally:
        w.close()


def test_unknown_tokens_are_rate_limited_per_address_before_any_lookup(world):
    bad = [world.call("GET", "/v1/whoami", {"Authorization": f"Bearer sct_guess{i}"}) for i in range(25)]
    codes = [r.status_code for r in bad]
    assert codes[:20] == [401] * 20 and set(codes[20:]) == {429}, codes
    assert "unknown tokens from this address" in bad[-1].json()["detail"] and int(bad[-1].headers["Retry-After"]) >= 1
    # a real token from that address waits too (its lookup is what the guesses cost), then works
    time.sleep(int(bad[-1].headers["Retry-After"]))
    assert world.call("GET", "/v1/whoami", world.tokens["llm", "viewer"]).status_code == 200


def test_a_higher_priority_request_preempts_and_the_lower_one_comes_back(world):
    web, llm, op = world.tokens["web", "member"], world.tokens["llm", "member"], world.op
    assert world.ok("POST", "/v1/projects/web/clusters", web, {"name": "big", "gpus": 128})["state"] == "ready"  # the whole fleet
    # priority is granted by the operator per project: asking above it is refused, nothing changed
    r = world.call("POST", "/v1/projects/llm/clusters", llm, {"name": "urgent", "gpus": 64, "priority": 5})
    assert r.status_code == 403 and "priority up to 0" in r.json()["detail"]
    # same priority: no preemption, it queues in the fleet
    assert world.ok("POST", "/v1/projects/llm/clusters", llm, {"name": "plain", "gpus": 8})["state"] == "queued"
    world.ok("DELETE", "/v1/projects/llm/clusters/plain", llm)
    world.ok("PUT", "/v1/projects/llm/quota", op, {"gpu_type": "h100", "max_priority": 5})
    urgent = world.ok("POST", "/v1/projects/llm/clusters", llm, {"name": "urgent", "gpus": 64, "priority": 5})
    assert urgent["state"] == "ready" and len(urgent["nodes"]) == 8
    big = world.ok("GET", "/v1/projects/web/clusters/big", web)
    assert big["state"] == "queued" and big["reason"].startswith("preempted by cluster 'llm/urgent' (priority 5 over 0)")
    assert big["nodes"] == []
    world.ok("DELETE", "/v1/projects/llm/clusters/urgent", llm)
    big = world.ok("GET", "/v1/projects/web/clusters/big", web)
    assert big["state"] == "ready" and len(big["nodes"]) == 16 and big["reason"] is None
    # web was charged by the fleet for two intervals, not for the time it was preempted
    from supercluster.cluster.state import AllocationInterval

    with world.store.session() as s:
        spans = s.execute(sa.select(AllocationInterval.started_at, AllocationInterval.ended_at, AllocationInterval.end_reason)
                          .where(AllocationInterval.cluster_name.like("%.big")).order_by(AllocationInterval.id)).all()
    assert len(spans) == 2 and spans[0].end_reason == "preempted" and spans[1].started_at >= spans[0].ended_at
    assert spans[1].ended_at is None


def test_nul_characters_are_refused_before_the_database(world):
    h = world.tokens["llm", "admin"]
    assert world.call("GET", "/v1/projects/ll%00m/clusters", h).status_code == 422
    assert world.call("GET", "/v1/usage?by=pro%00ject", h).status_code == 422
    assert world.call("POST", "/v1/tokens", h, {"user": "x\x00", "project": "llm"}).status_code == 422
    r = world.call("POST", "/v1/projects/llm/jobs", h, {"cluster": "c", "config": {}, "overrides": ["a.b=\x00"]})
    assert r.status_code == 422


def test_past_the_budget_running_clusters_stop_and_resume_when_it_is_raised(world):
    from supercluster.service import resources

    member, op = world.tokens["llm", "member"], world.op
    world.ok("POST", "/v1/projects/llm/clusters", member, {"name": "a", "gpus": 64})
    world.ok("POST", "/v1/projects/web/clusters", world.tokens["web", "member"], {"name": "w", "gpus": 8})
    world.ok("PUT", "/v1/projects/llm/quota", op, {"gpu_type": "h100", "gpu_hours": 10.0})
    assert resources.enforce_budgets(world.store) == []  # well within it
    # a budget that 64 GPUs use up in about half a second more (set again if the clock passed it meanwhile)
    while True:
        spent = world.ok("GET", "/v1/projects/llm/quota", member)["quotas"][0]["used_gpu_hours"]
        budget = spent + 64 * 0.5 / 3600
        if world.call("PUT", "/v1/projects/llm/quota", op, {"gpu_type": "h100", "gpu_hours": budget}).status_code == 200:
            break
    deadline = time.monotonic() + 60
    while not (stopped := resources.enforce_budgets(world.store)):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert stopped == ["llm/a"]
    a = world.ok("GET", "/v1/projects/llm/clusters/a", member)
    assert a["state"] == "waiting" and f"spent its {budget:g} h100 GPU-hour budget" in a["reason"] and a["nodes"] == []
    assert world.ok("GET", "/v1/projects/web/clusters/w", world.tokens["web", "member"])["state"] == "ready"  # not web's
    world.ok("PUT", "/v1/projects/llm/quota", op, {"gpu_type": "h100", "gpu_hours": 1000.0})
    assert world.ok("GET", "/v1/projects/llm/clusters/a", member)["state"] == "ready"
