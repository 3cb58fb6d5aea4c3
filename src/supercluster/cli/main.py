"""The `supercluster` command. Thin: each area registers its commands from its own module.

Heavy imports (torch) happen inside the commands, so `supercluster plan` starts fast.
"""

import sys

import typer

from supercluster.errors import UserError

app = typer.Typer(
    name="supercluster",
    help="Plan, allocate, train and keep healthy an AI supercomputer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


from supercluster.cli import cluster, health, plan, serve_import, train  # noqa: E402  (thin: heavy imports live in the commands)

for _area in (train, plan, cluster, health, serve_import):
    _area.register(app)


def main(argv=None):
    try:
        app(args=argv, standalone_mode=False)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as err:  # click's usage errors come through here in non-standalone mode
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
