"""The `supercluster` command. Thin: each area registers its commands from its own module.

Heavy imports (torch) happen inside the commands, so `supercluster plan` starts fast.
"""

import errno
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


from supercluster.cli import cluster, data, health, operator, plan, serve, serve_import, service, train  # noqa: E402  (thin: heavy imports live in the commands)

for _area in (train, data, plan, cluster, health, serve_import, serve, service, operator):
    _area.register(app)

USAGE_EXIT = 2

# Errors of the machine rather than of the code: the file they name and the fix are the message.
FULL = {errno.ENOSPC, errno.EDQUOT}
DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def _is_a(err: BaseException, class_name: str) -> bool:
    """Whether `err` derives from click's class of that name, whichever click raised it.

    Typer vendors its own copy of click (`typer._click`) in some releases and uses the
    installed click in others; the two hierarchies share class names, not classes.
    """
    return any(cls.__name__ == class_name for cls in type(err).__mro__)


def usage_line(err: BaseException) -> str:
    """A click usage error as one line that names where to look for the fix."""
    message = " ".join(err.format_message().split())  # click may break "Did you mean" onto its own line
    ctx = getattr(err, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    return f"error: {message.rstrip('.')}{where}."


def os_error_line(err: OSError) -> str | None:
    """A full disk or a refused path as one line, or None for an OSError that is a bug."""
    if err.errno not in FULL | DENIED:
        return None
    where = f" ({err.filename})" if err.filename else ""
    fix = "free some space" if err.errno in FULL else "pick a path you may use, or fix its permissions"
    return f"error: {err.strerror}{where}; {fix}, then run the command again."


def main(argv=None):
    try:
        code = app(args=argv, standalone_mode=False)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USAGE_EXIT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except OSError as err:
        line = os_error_line(err)
        if line is None:
            raise
        print(line, file=sys.stderr)
        sys.exit(1)
    except Exception as err:  # click's usage errors come through here in non-standalone mode
        if _is_a(err, "NoArgsIsHelpError"):
            sys.exit(USAGE_EXIT)  # the help is already on the screen
        if _is_a(err, "ClickException"):
            print(usage_line(err), file=sys.stderr)
            sys.exit(USAGE_EXIT)
        if _is_a(err, "Abort"):
            print("aborted", file=sys.stderr)
            sys.exit(1)
        raise
    if isinstance(code, int) and code:  # a command's typer.Exit(code): click returns it outside standalone mode
        sys.exit(code)


if __name__ == "__main__":
    main()
