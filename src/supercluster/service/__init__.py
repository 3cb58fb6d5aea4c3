"""The multi-tenant service: many teams share one fleet through an authenticated REST API.

    models.py      the service's tables (orgs, projects, users, tokens, quotas, clusters, jobs, usage, audit)
    store.py       opens the database (the fleet's, plus the service tables migrated by Alembic: migrations/)
    auth.py        tokens (hashed at rest), the caller of a request, per-token rate limits
    tenancy.py     orgs, projects, users and tokens, and who may see or change each
    resources.py   a project's clusters, jobs and quota on the fleet; priorities, preemption, budgets
    usage.py       GPU-seconds from allocation intervals, priced from prices.py (dated list prices)
    schemas.py     request bodies (unknown fields refused)
    app.py         the FastAPI application: routes, authentication gate, audit, errors; static/ the dashboard
    client.py      the CLI's side: stored login, one JSON call to a server
"""
