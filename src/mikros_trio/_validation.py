"""Request validation failures as Mikros ValidationErrors, with the path of every field at fault.

The HTTP kind calls :func:`invalid_request` for what a request model
refused: FastAPI's and pydantic's errors list their problems
(``errors()``); anything else (msgspec's, which names the path in its
text) is its text. The paths go out three ways, so every Mikros
client reads them: in the message (what a person reads), in the cause
(``details``/``cause``, the only free text Go decodes) and as
``attributes.fields`` (JSON, which Rust decodes).
"""

from __future__ import annotations

from .errors import ValidationError

__all__ = ["invalid_request"]

#: Problems reported per request: a body with thousands of bad items must
#: not become an answer of that size.
MAX_FIELDS = 20
#: Characters kept of a path or message: a path holds the client's own keys.
MAX_TEXT = 200
#: Problems quoted in the message; the cause and attributes carry the rest.
MESSAGE_FIELDS = 5


def _problems(error: BaseException) -> list[dict[str, str]]:
    """``[{"path": ..., "message": ...}]`` for ``error``; the path is empty for the whole input."""
    listed = getattr(error, "errors", None)
    items = listed() if callable(listed) else None
    if isinstance(items, list | tuple):
        return [
            {
                "path": _clip(".".join(str(part) for part in item.get("loc", ()))),
                "message": _clip(str(item.get("msg", ""))),
            }
            for item in items[:MAX_FIELDS]
            if isinstance(item, dict)
        ]
    return [{"path": "", "message": _clip(str(error))}]


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "\u2026"


def _line(problem: dict[str, str]) -> str:
    return f"{problem['path']}: {problem['message']}" if problem["path"] else problem["message"]


def invalid_request(error: BaseException) -> ValidationError:
    """The ValidationError a caller gets when a request model refused its input (``error``)."""
    problems = _problems(error) or [{"path": "", "message": "invalid request"}]
    lines = [_line(problem) for problem in problems]
    message = "request validation failed: " + "; ".join(lines[:MESSAGE_FIELDS])
    return ValidationError(message, details="; ".join(lines), attributes={"fields": problems})
