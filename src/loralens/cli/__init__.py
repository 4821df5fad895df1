"""The ``loralens`` command line. Each module below registers its commands on the shared typer app."""

from __future__ import annotations

from loralens.cli import core  # noqa: F401  (registers conversion, similarity, demo)
from loralens.cli._app import app


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
