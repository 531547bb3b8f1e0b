"""Griffe extension: ``#:`` comments above an attribute are its docstring.

The package documents constants and class attributes the Sphinx way, with
``#:`` comment lines right above the assignment (``GRPC_STATUS``,
``ClientChannel.connect_timeout``). Griffe reads only string docstrings
after an assignment, so without this those attributes would be
undocumented, and left out of the reference.
"""

from __future__ import annotations

import ast
from typing import Any

import griffe


class CommentDocstrings(griffe.Extension):
    def on_attribute_instance(
        self, *, node: ast.AST | griffe.ObjectNode, attr: griffe.Attribute, **kwargs: Any
    ) -> None:
        if attr.docstring is not None or attr.lineno is None or attr.filepath is None:
            return
        lines = attr.lines_collection[attr.filepath]  # type: ignore[index]
        comment: list[str] = []
        number = attr.lineno - 2  # the line above the assignment, 0-based
        while number >= 0 and lines[number].lstrip().startswith("#:"):
            comment.insert(0, lines[number].lstrip()[2:].strip())
            number -= 1
        if comment:
            attr.docstring = griffe.Docstring(
                "\n".join(comment), lineno=number + 2, endlineno=attr.lineno - 1, parent=attr
            )
