"""The ``loralens`` command line. Each module below registers its commands on the shared typer app."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:  # typed against the installed typer, which vendors click as typer._click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
else:
    try:  # recent typer vendors click as typer._click; earlier versions use click itself
        from typer._click.exceptions import NoArgsIsHelpError, UsageError
    except ImportError:  # pragma: no cover
        from click.exceptions import NoArgsIsHelpError, UsageError

# Registration order is the order of the help panels and of the commands in them.
from loralens.cli import core  # noqa: F401, I001  (registers conversion, similarity, demo)
import loralens.cli.lowrank  # noqa: F401  (registers overlap, amplification, spectra)
import loralens.cli.intruders  # noqa: F401  (registers intruders)
import loralens.cli.zoo  # noqa: F401  (registers zoo)
import loralens.cli.dora  # noqa: F401  (registers dora)
import loralens.cli.figures  # noqa: F401  (registers figure, report)
import loralens.cli.condlora  # noqa: F401  (registers train, compare, params, export)
import loralens.cli.reproduce  # noqa: F401  (registers reproduce table2)
from loralens.cli._app import EXIT_INTERRUPTED, EXIT_USER_ERROR, app, reflow_help
from loralens.io.outputs import interrupt_on_termination

reflow_help(app)


def main() -> None:
    """Console-script entry point: usage errors, like every other user error, are one line and exit 2.

    SIGTERM and SIGHUP (a closed terminal, ``kill``, a job scheduler's time limit) are handled as Ctrl-C: the
    run stops, its staging folder is removed, nothing half-written is left, exit 130.
    """
    interrupt_on_termination()
    if sys.stderr is None:  # started with stderr closed (2>&-): messages go nowhere rather than crash
        sys.stderr = Path(os.devnull).open("w")  # noqa: SIM115  (lives as long as the process)
    if sys.stdout is None:  # started with stdout closed (>&-): Python has no stream to print results to
        typer.echo("error: standard output is closed; redirect it to a file or to /dev/null", err=True)
        sys.exit(EXIT_USER_ERROR)
    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as e:  # bare `loralens` or a command with no options: show its help
        typer.echo(e.ctx.get_help() if e.ctx else "", err=True)
        code = EXIT_USER_ERROR
    except UsageError as e:
        where = f"loralens {e.ctx.command.name} --help" if e.ctx and e.ctx.parent else "loralens --help"
        typer.echo(f"error: {' '.join(e.format_message().split())} (see '{where}')", err=True)
        code = EXIT_USER_ERROR
    except typer.Abort:  # Ctrl-C while click itself is prompting or parsing
        typer.echo("interrupted; no partial output was written", err=True)
        code = EXIT_INTERRUPTED
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
