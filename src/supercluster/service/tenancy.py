"""Organizations, projects, users and tokens, and who may see or change each.

The operator (the token `supercluster server init` prints) may do anything. Every other token is
scoped to one project and a role in it: it never sees another project's objects, and asking for
one answers 404 as for a name that does not exist, so that names do not leak across tenants.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.orm import Session

from supercluster.service.auth import Caller, ServiceError, hash_token, new_token, rank
from supercluster.service.models import Org, Project, Token, User

DEFAULT_TOKEN_DAYS = 30
MAX_TOKEN_DAYS = 365


def require(caller: Caller, role: str) -> None:
    if not caller.at_least(role):
        raise ServiceError(403, f"This needs the {role} role; your token has {caller.role}.")


def require_operator(caller: Caller) -> None:
    if not caller.is_operator:
        raise ServiceError(403, "Only the fleet operator may do this; ask them.")


def _taken(s: Session, model, name: str, what: str) -> None:
    if s.scalar(sa.select(model.id).where(model.name == name)) is not None:
        raise _exists(what, name)


def _exists(what: str, name: str) -> ServiceError:
    return ServiceError(409, f"A {what} named {name!r} already exists; choose another name.")


def _add_named(s: Session, row, what: str) -> None:
    """Adds a row named by the caller. A request beside this one that made the same name first
    (on PostgreSQL `_taken` cannot see its row before it commits; the unique key then refuses
    ours) is answered as `_taken` answers, not with a 500."""
    s.add(row)
    try:
        s.flush()
    except sa.exc.IntegrityError:
        raise _exists(what, row.name) from None


def refuse_if_initialized(s: Session) -> None:
    if s.scalar(sa.select(User.id).where(User.is_operator)) is not None:
        raise ServiceError(409, "The service is already initialized; use the operator token it printed then.")


def init_operator(s: Session, name: str = "operator") -> str:
    """The first user and its token; refused once an operator exists (the token is shown once)."""
    refuse_if_initialized(s)
    user = User(name=name, org_id=None, is_operator=True, created_at=time.time())
    s.add(user)
    s.flush()
    token, _ = issue_token(s, user, None, "admin", None)
    return token


def issue_token(s: Session, user: User, project: Project | None, role: str, days: float | None) -> tuple[str, Token]:
    token = new_token()
    row = Token(user_id=user.id, project_id=project.id if project else None, role=role, token_hash=hash_token(token),
                prefix=token[:10], expires_at=time.time() + days * 86400 if days else None, revoked_at=None,
                created_at=time.time())
    s.add(row)
    s.flush()
    return token, row


# ---- orgs and projects ------------------------------------------------------------------------


def org_dict(o: Org) -> dict:
    return {"name": o.name, "created_at": o.created_at}


def project_dict(s: Session, p: Project) -> dict:
    return {"name": p.name, "org": s.get(Org, p.org_id).name, "created_at": p.created_at}


def create_org(s: Session, caller: Caller, name: str) -> dict:
    require_operator(caller)
    _taken(s, Org, name, "organization")
    org = Org(name=name, created_at=time.time())
    _add_named(s, org, 'organization')
    return org_dict(org)


def visible_org(s: Session, caller: Caller, name: str) -> Org:
    org = s.scalar(sa.select(Org).where(Org.name == name))
    if org is None or not (caller.is_operator or org.id == caller.org_id):
        raise ServiceError(404, f"No organization named {name!r} is visible to this token.")
    return org


def list_orgs(s: Session, caller: Caller) -> list[dict]:
    query = sa.select(Org).order_by(Org.id)
    if not caller.is_operator:
        query = query.where(Org.id == caller.org_id)
    return [org_dict(o) for o in s.scalars(query)]


def create_project(s: Session, caller: Caller, org: str, name: str) -> dict:
    require_operator(caller)
    o = visible_org(s, caller, org)
    _taken(s, Project, name, "project")
    p = Project(org_id=o.id, name=name, created_at=time.time())
    _add_named(s, p, 'project')
    return project_dict(s, p)


def list_projects(s: Session, caller: Caller, org: str) -> list[dict]:
    o = visible_org(s, caller, org)
    query = sa.select(Project).where(Project.org_id == o.id).order_by(Project.id)
    if not caller.is_operator:
        query = query.where(Project.id == caller.project_id)
    return [project_dict(s, p) for p in s.scalars(query)]


def visible_project(s: Session, caller: Caller, name: str, role: str = "viewer") -> Project:
    """The project `name` if this token may act on it with `role`: 404 for others' projects, 403 for too low a role."""
    if not caller.is_operator and caller.project_org_id is not None:
        # A tenant's token sees its own project only, and a project is never renamed or deleted:
        # no read is needed (every project route asks this first). Any other name answers 404,
        # whether or not such a project exists. The Project returned is a new, transient object.
        if name != caller.project:
            raise ServiceError(404, f"No project named {name!r} is visible to this token.")
        require(caller, role)
        return Project(id=caller.project_id, org_id=caller.project_org_id, name=caller.project,
                       created_at=caller.project_created_at)
    p = s.scalar(sa.select(Project).where(Project.name == name))
    if p is None or not (caller.is_operator or p.id == caller.project_id):
        raise ServiceError(404, f"No project named {name!r} is visible to this token.")
    require(caller, role)
    return p


# ---- users ---------------------------------------------------------------------------------------


def user_dict(s: Session, u: User) -> dict:
    org = s.get(Org, u.org_id) if u.org_id is not None else None
    return {"name": u.name, "org": org.name if org else None, "operator": u.is_operator, "created_at": u.created_at}


def create_user(s: Session, caller: Caller, name: str, org: str) -> dict:
    require(caller, "admin")
    o = visible_org(s, caller, org)
    _taken(s, User, name, "user")
    u = User(name=name, org_id=o.id, is_operator=False, created_at=time.time())
    _add_named(s, u, 'user')
    return user_dict(s, u)


def list_users(s: Session, caller: Caller) -> list[dict]:
    query = sa.select(User).order_by(User.id)
    if not caller.is_operator:
        query = query.where(User.org_id == caller.org_id) if caller.at_least("admin") else query.where(User.id == caller.user_id)
    return [user_dict(s, u) for u in s.scalars(query)]


# ---- tokens --------------------------------------------------------------------------------------


def token_dict(s: Session, t: Token) -> dict:
    project = s.get(Project, t.project_id) if t.project_id is not None else None
    return {"id": t.id, "user": s.get(User, t.user_id).name, "project": project.name if project else None, "role": t.role,
            "prefix": t.prefix, "expires_at": t.expires_at, "revoked_at": t.revoked_at, "created_at": t.created_at}


def create_token(s: Session, caller: Caller, user: str, project: str, role: str, days: float | None) -> dict:
    """A token for `user` in `project`; an admin grants at most its own role, in its own project."""
    p = visible_project(s, caller, project, "admin")
    u = s.scalar(sa.select(User).where(User.name == user))
    if u is None or not (caller.is_operator or u.org_id == caller.org_id):
        raise ServiceError(404, f"No user named {user!r} is visible to this token.")
    if u.org_id != p.org_id:
        raise ServiceError(422, f"User {user!r} is not in project {project!r}'s organization; create the user there first.")
    if not caller.is_operator and rank(role) > rank(caller.role):
        raise ServiceError(403, f"Your {caller.role} token cannot grant the {role} role.")
    days = DEFAULT_TOKEN_DAYS if days is None else days
    token, row = issue_token(s, u, p, role, days)
    return {**token_dict(s, row), "token": token}


def list_tokens(s: Session, caller: Caller) -> list[dict]:
    query = sa.select(Token).order_by(Token.id)
    if not caller.is_operator:
        query = query.where(Token.project_id == caller.project_id) if caller.at_least("admin") else query.where(Token.id == caller.token_id)
    return [token_dict(s, t) for t in s.scalars(query)]


def revoke_token(s: Session, caller: Caller, token_id: int) -> dict:
    t = s.get(Token, token_id)
    mine = t is not None and (caller.is_operator or t.id == caller.token_id
                              or (caller.at_least("admin") and t.project_id == caller.project_id))
    if not mine:
        raise ServiceError(404, f"No token {token_id} is visible to this token.")
    if t.revoked_at is not None:
        raise ServiceError(409, f"Token {token_id} is already revoked.")
    t.revoked_at = time.time()
    return token_dict(s, t)
