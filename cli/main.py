"""The `cryowae` Typer application and its error handling.

Every command module in this package exposes `register(app)`; command bodies import the
library lazily so `cryowae --help` stays fast. Bad input anywhere (CryowaeInputError, a
usage error, a full disk) ends as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

# Idle OpenMP threads sleep instead of spinning (set before torch is imported): on a
# busy CPU node spinning threads made small torch operations 10-20x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer

from cryowae import __version__
from cryowae.errors import CryowaeInputError

app = typer.Typer(
    name="cryowae",
    help="Restore cryo-electron tomograms: fill the missing wedge, remove noise, and show "
    "what the data leave undetermined.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

#: command modules of this package, each with a `register(app)` function
COMMAND_MODULES = (
    "simulate",
    "evaluate",
    "train",
    "restore",
    "sample",
    "restore_batch",
    "view",
    "data",
    "inspect",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cryowae {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """cryowae: 3D Wasserstein-autoencoder restoration of cryo-electron tomograms."""


def _register_all() -> None:
    """Register every command; a command module that fails to import is an error (a
    broken install must not lose a command silently)."""
    for name in COMMAND_MODULES:
        importlib.import_module(f"cryowae.cli.{name}").register(app)


_register_all()


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit."""
    print(f"cryowae: error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `cryowae` script and of `python -m cryowae`."""
    from cryowae.cpu_memory import keep_freed_memory

    keep_freed_memory()  # long CPU runs: no page faults of re-mapped activations
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="cryowae", standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        fail("aborted", 130)
    except typer.TyperException as exc:  # usage errors: unknown option, bad value...
        if type(exc).__name__ == "NoArgsIsHelpError":
            ctx = getattr(exc, "ctx", None)
            typer.echo(ctx.get_help() if ctx is not None else "cryowae --help")
            sys.exit(0)
        fail((exc.format_message() or str(exc)).splitlines()[0])
    except CryowaeInputError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted; outputs were not written (checkpoints, where any, are kept)", 130)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            fail(f"no space left on device while writing {exc.filename or 'output'}")
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fail(f"permission denied: {exc.filename or exc}")
        raise
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
