"""MkDocs hook: drop Sphinx cross-reference roles (``:func:``, ``:class:``, ...) left in rendered docstrings.

The docstrings in src/ are numpydoc with reST roles such as ``:func:`layer_similarity```; mkdocstrings renders the
backticked name as code but keeps the role's prefix as text (":func:layer_similarity"). This removes the prefix
in the HTML of every page, so the name reads as plain code. The docstrings themselves stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|const):(?=<code>)")


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    return _ROLE.sub("", html)
