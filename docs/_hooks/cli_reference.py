"""MkDocs hook: generate the command reference in ``cli.md`` from the typer app itself.

The marker ``<!-- loralens-cli-reference -->`` in ``docs/cli.md`` is replaced by the Markdown that
``typer loralens.cli utils docs --name loralens`` prints, produced in-process (no subprocess, no network), so every
command, option, default and help text comes from the code at build time. Headings are moved one level down to sit
under the page's own title. Any failure (an import error in the CLI, a changed typer API) fails the build instead of
leaving an empty page.

(mkdocs-typer2 would be the off-the-shelf choice, but its native engine does not handle typer >= 0.24's vendored
click, and its legacy engine shells out to ``typer`` on PATH and silently renders nothing when that fails.)
"""

from __future__ import annotations

import re
from typing import Any

MARKER = "<!-- loralens-cli-reference -->"


def _reference() -> str:
    import typer
    import typer.main
    from typer.cli import MARKUP_MODE_KEY, get_docs_for_click

    from loralens.cli import app

    command = typer.main.get_command(app)
    ctx = typer.Context(command)
    ctx.ensure_object(dict)
    ctx.obj[MARKUP_MODE_KEY] = app.rich_markup_mode
    text = get_docs_for_click(obj=command, ctx=ctx, name="loralens")
    out, fenced = [], False
    for line in text.strip().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        out.append("#" + line if not fenced and re.match(r"#+ ", line) else line)
    return "\n".join(out) + "\n"


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, _reference())
