"""Stored health results read back: each node's state and its history, newest first.

`gate.record` stores every check with its level, threshold source and per-device figures as a
JSON `detail`; this turns them back into dicts for `supercluster health report` (and any client).
"""

from __future__ import annotations

import json

from supercluster.cluster import fleet
from supercluster.health import targets


def health_report(node: str | None = None, limit: int = 50, db=None) -> dict:
    """Nodes' health state and their stored results, newest first (`supercluster health report`).

    Each result's `detail` comes back as the dict `record` stored (level, threshold source,
    per-device figures); a detail written by something else is kept as {"text": ...}.
    """
    nodes = targets.fleet_nodes(node, None, db) if node else fleet.nodes(db)
    history = fleet.health_history(db, node=node, limit=limit)
    for row in history:
        try:
            row["detail"] = json.loads(row["detail"]) if row["detail"] else {}
        except ValueError:
            row["detail"] = {"text": row["detail"]}
    keys = ("name", "state", "reason", "last_health_status", "last_health_at")
    return {"nodes": [{k: n[k] for k in keys} for n in nodes], "history": history}
