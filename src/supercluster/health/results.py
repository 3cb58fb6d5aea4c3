"""What a health check produces: raw measurements on a node, verdicts after judging them.

Measuring and judging are separate so that a node measured through Slurm can be judged by
the launcher against the catalog and the calibrated baselines, with one set of rules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
# A node is `incomplete` when a check that applies to it could not be judged (a tool missing,
# no baseline): that is never counted as passed.
INCOMPLETE = "incomplete"

# The process exit code of a health run, for scripts and Slurm prolog/epilog hooks (as NHC's):
# anything but 0 keeps the node from taking work. 2 is taken by usage errors (the CLI's
# UserError), so a run nobody could fully judge gets 3, distinct from a failure.
EXIT_CODES = {PASSED: 0, FAILED: 1, INCOMPLETE: 3}


@dataclass
class Measurement:
    """One check's raw result on one node; `value` is None when the check could not run."""

    check: str
    value: float | None
    unit: str
    detail: dict = field(default_factory=dict)  # per-device figures, sizes used, raw counts
    skip_reason: str | None = None
    # False when the check makes no sense on this node (host<->device copy on a CPU node):
    # skipping it then does not stop the node from passing.
    applies: bool = True

    @classmethod
    def skipped(cls, check: str, unit: str, reason: str, applies: bool = True) -> "Measurement":
        return cls(check, None, unit, skip_reason=reason, applies=applies)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Measurement":
        return cls(**data)


@dataclass
class CheckResult:
    """A measurement judged against a threshold: passed, failed or skipped (with the reason)."""

    check: str
    status: str
    value: float | None
    unit: str
    threshold: float | None = None
    comparison: str | None = None  # ">=" | "<=" | "=="
    source: str | None = None  # where the threshold comes from
    reason: str | None = None  # why skipped, or what failed
    applies: bool = True
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class NodeReport:
    node: str
    machine_key: str
    level: str
    started_at: float  # unix seconds
    duration_s: float
    checks: list[CheckResult]

    @property
    def status(self) -> str:
        statuses = [c.status for c in self.checks]
        if FAILED in statuses:
            return FAILED
        if any(c.status == SKIPPED and c.applies for c in self.checks) or PASSED not in statuses:
            return INCOMPLETE
        return PASSED

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status == FAILED]

    def summary(self) -> str:
        """One line for a drain reason or a table cell."""
        if self.failures:
            return "; ".join(f"{c.check}: {c.reason}" for c in self.failures)
        unjudged = [c.check for c in self.checks if c.status == SKIPPED and c.applies]
        return f"not judged: {', '.join(unjudged)}" if unjudged else "all checks passed"

    def to_dict(self) -> dict:
        return {
            "node": self.node,
            "machine_key": self.machine_key,
            "level": self.level,
            "status": self.status,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "summary": self.summary(),
            "checks": [c.to_dict() for c in self.checks],
        }


def run_status(node_statuses: list[str], fabric: dict | None = None) -> str:
    """The verdict of a whole run: failed if anything failed, incomplete if anything applicable
    went unjudged (a node, or the multi-node all-reduce of a cluster), else passed."""
    statuses = list(node_statuses)
    if fabric is not None and (fabric["status"] != SKIPPED or fabric["applies"]):
        statuses.append(INCOMPLETE if fabric["status"] == SKIPPED else fabric["status"])
    if FAILED in statuses:
        return FAILED
    if INCOMPLETE in statuses or not statuses:
        return INCOMPLETE
    return PASSED
