"""Health results into the fleet: history, drain on failure, resume after a pass.

The fleet database and the backends (Slurm drains included) belong to `supercluster.cluster`;
this module only decides. A node is drained when a check fails; a node that health drained
(reason "health: ...") returns to service only when a later run passes. A node drained by an
operator for another reason is left alone. An `incomplete` run (a check that applies could not
be judged) is stored as not passed, so `cluster create` does not take it as healthy, but drains
nothing: nothing was found wrong.
"""

from __future__ import annotations

import json

from supercluster.cluster import fleet
from supercluster.health.results import FAILED, PASSED, CheckResult, NodeReport
from supercluster.health.stragglers import Straggler

DRAIN_PREFIX = "health: "
MAX_REASON = 200  # a drain reason is a one-line note for `sinfo -R`; the history holds the details


def _row(check: CheckResult, level: str) -> dict:
    row = check.to_dict()
    # the table has no columns for these: keep them with the figures for `health report`
    extra = {k: row[k] for k in ("comparison", "source", "reason", "applies") if row[k] is not None}
    row["detail"] = json.dumps({"level": level, **extra, **row["detail"]}, sort_keys=True)
    return row


def record(report: NodeReport, db=None) -> str:
    """Stores the report and applies the gate. Returns what happened: drained, resumed, recorded."""
    fleet.record_health(db, report.node, [_row(c, report.level) for c in report.checks],
                        passed=report.status == PASSED, measured_at=report.started_at)
    node = next(n for n in fleet.nodes(db) if n["name"] == report.node)
    if report.status == FAILED:
        fleet.drain_node(report.node, (DRAIN_PREFIX + report.summary())[:MAX_REASON], db=db)
        return "drained"
    if report.status == PASSED and node["state"] == "drain" and (node["reason"] or "").startswith(DRAIN_PREFIX):
        fleet.resume_node(report.node, db=db)
        return "resumed"
    return "recorded"


def report_stragglers(stragglers: list[Straggler], db=None, drain: bool = False) -> list[str]:
    """Counts stragglers against their nodes' health: a failed `straggler` result in the history.

    That marks the node's last health as failed, so new clusters avoid it until it passes a
    health check again; with `drain=True` it is also drained (running jobs keep it, as Slurm's
    DRAIN lets them finish). Hosts not in the fleet are skipped; returns the nodes counted.
    """
    counted = []
    for s in stragglers:
        if not fleet.has_node(db, s.host):
            continue
        fleet.record_health(db, s.host, [{
            "check": "straggler", "value": s.ratio, "unit": "x median step time", "threshold": None,
            "status": FAILED, "detail": json.dumps(s.to_dict(), sort_keys=True),
        }], passed=False)
        if drain:
            fleet.drain_node(s.host, DRAIN_PREFIX + s.describe(), db=db)
        counted.append(s.host)
    return counted

