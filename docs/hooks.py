"""MkDocs hook: Sphinx roles in docstrings become (optional) cross-references.

The package's docstrings name other objects the Sphinx way
(``:class:`~mikros_trio.Call```), which Markdown renders as the role's text
followed by a code span. This rewrites each into a link to the object's
reference entry when the site documents it, and into the bare code span
otherwise (an ``optional`` autoref never warns), so the docstrings need no
mass edit. A ``~`` prefix shows the last component only, as in Sphinx.
A paragraph ending in Sphinx's ``::`` (a code block follows) ends in one
colon, as Sphinx shows it.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|func|meth|attr|data|exc|mod|obj):<code>(~?)([\w.]+)</code>")


def _link(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    shown = target.rsplit(".", 1)[-1] if tilde else target.lstrip(".")
    if target.startswith("."):  # relative to a module the page does not say: no link
        return f"<code>{shown}</code>"
    return f'<autoref identifier="{target}" optional><code>{shown}</code></autoref>'


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub(_link, html).replace("::</p>", ":</p>")
