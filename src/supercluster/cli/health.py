"""`supercluster health`: check nodes, calibrate baselines, show the history.

    supercluster health [local | --node NAME | --cluster NAME] [--level quick|full] [--json]
    supercluster health calibrate [--level full] [--repeats 3] [--json]
    supercluster health report [--node NAME] [--limit 50] [--json]
"""

from __future__ import annotations

import json

import typer

from supercluster.cli.flags import DbOption, JsonOption

LEVEL = typer.Option("quick", "--level", help="quick (seconds) or full (larger sizes, longer runs)")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _print_reports(reports: list[dict], fabric: dict | None, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"nodes": reports, "fabric": fabric}, indent=1, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for r in reports:
        table = Table(title=f"{r['node']}: {r['status']} ({r['level']}, {r['duration_s']:.1f} s) - {r['action']}")
        for column in ("check", "status", "value", "unit", "threshold", "why"):
            table.add_column(column)
        for c in r["checks"]:
            style = {"passed": "green", "failed": "red"}.get(c["status"], "yellow")
            threshold = f"{c['comparison']} {_fmt(c['threshold'])}" if c["threshold"] is not None else "-"
            table.add_row(c["check"], f"[{style}]{c['status']}[/]", _fmt(c["value"]), c["unit"], threshold,
                          c["reason"] or c["source"] or "")
        console.print(table)
        console.print(r["summary"])
    if fabric is not None:
        value = f"{_fmt(fabric['value'])} {fabric['unit']}"
        console.print(f"multi-node all-reduce: {fabric['status']}, {value} ({fabric['reason'] or fabric['source']})")


def _run(node: str | None, cluster: str | None, level: str, as_json: bool, record: bool, db: str | None) -> None:
    from supercluster.health import targets
    from supercluster.health.results import EXIT_CODES, run_status

    reports, fabric = targets.run_checks(node, cluster, level, record, db)
    _print_reports(reports, fabric, as_json)
    code = EXIT_CODES[run_status([r["status"] for r in reports], fabric)]
    if code:
        raise SystemExit(code)


def register(app: typer.Typer) -> None:
    health = typer.Typer(help="Check nodes against pass marks and baselines; drain the ones that fail.\n\n"
                              "Exit code: 0 every check passed; 1 a check failed; 2 a usage error; "
                              "3 incomplete (a check that applies could not be judged: a tool missing or "
                              "failing, no baseline), so a Slurm prolog never passes a node nobody judged.",
                         invoke_without_command=True, no_args_is_help=False)

    @health.callback()
    def check(ctx: typer.Context, node: str = typer.Option(None, "--node", help="a fleet node"),
              cluster: str = typer.Option(None, "--cluster", help="every node of a cluster"),
              level: str = LEVEL, as_json: JsonOption = False,
              record: bool = typer.Option(True, "--record/--no-record", help="store results and drain/resume"),
              db: DbOption = None):
        """Run the health checks on this machine (default), one node or a cluster."""
        if ctx.invoked_subcommand is None:
            _run(node, cluster, level, as_json, record, db)

    @health.command("local")
    def local(level: str = LEVEL, as_json: JsonOption = False,
              record: bool = typer.Option(True, "--record/--no-record", help="store results and drain/resume"),
              db: DbOption = None):
        """Run the health checks on this machine."""
        _run(None, None, level, as_json, record, db)

    @health.command("calibrate")
    def calibrate(level: str = typer.Option("full", "--level", help="quick or full"),
                  repeats: int = typer.Option(3, "--repeats", help="runs to take the median and noise from"),
                  cluster: str = typer.Option(None, "--cluster", help="add this cluster's multi-node all-reduce"),
                  as_json: JsonOption = False, db: DbOption = None):
        """Record this known-good machine's (or cluster's) figures as the baseline for its kind."""
        from supercluster.health import targets

        kind, rows = targets.calibrate(level, repeats, cluster, db)
        if as_json:
            print(json.dumps({"kind": kind, "level": level, "repeats": repeats, "baseline": rows}, indent=1, sort_keys=True))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"baseline for {kind} ({level}, {repeats} runs)")
        for column in ("check", "median", "unit", "cv", "tolerance", "passes at"):
            table.add_column(column)
        for check, e in rows.items():
            table.add_row(check, _fmt(e["median"]), e["unit"], f"{e['cv']:.1%}", f"{e['tolerance']:.0%}",
                          _fmt(e["median"] * (1 - e["tolerance"])))
        Console().print(table)

    @health.command("report")
    def report(node: str = typer.Option(None, "--node", help="only this node"),
               limit: int = typer.Option(50, "--limit", min=1, help="newest results to show"),
               as_json: JsonOption = False, db: DbOption = None):
        """Nodes' health state and the history of their check results, newest first."""
        from supercluster.health.history import health_report

        data = health_report(node, limit, db)
        history = data["history"]
        if as_json:
            print(json.dumps(data, indent=1, sort_keys=True))
            return
        from datetime import datetime, timezone

        from rich.console import Console
        from rich.table import Table

        def when(t):
            return "-" if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")

        console = Console()
        table = Table(title="nodes")
        for column in ("node", "state", "last health", "checked (UTC)", "reason"):
            table.add_column(column)
        for n in data["nodes"]:
            table.add_row(n["name"], n["state"], n["last_health_status"] or "never", when(n["last_health_at"]), n["reason"] or "")
        console.print(table)
        table = Table(title=f"history (newest {limit})")
        for column in ("measured (UTC)", "node", "check", "status", "value", "unit", "threshold"):
            table.add_column(column)
        for h in history:
            table.add_row(when(h["measured_at"]), h["node"], h["check"], h["status"], _fmt(h["value"]), h["unit"] or "",
                          _fmt(h["threshold"]))
        console.print(table)

    app.add_typer(health, name="health")
