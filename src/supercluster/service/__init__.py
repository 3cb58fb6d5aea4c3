"""The multi-tenant service: many teams share one fleet through an authenticated REST API.

    models.py      the service's tables (orgs, projects, users, tokens, quotas, usage, audit)
    store.py       opens the database (fleet + service schema, Alembic migrations)
    auth.py        tokens (hashed at rest), roles, the caller of a request, rate limits
    tenancy.py     orgs, projects, users and tokens
    resources.py   clusters and jobs of a project, namespaced onto the fleet, with quotas
    usage.py       GPU-seconds from allocation intervals, priced from prices.py
    app.py         the FastAPI application: routes, audit of every mutating call, errors
"""
