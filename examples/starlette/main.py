"""A Starlette app on the HTTP kind: a notes API, with the probes, errors and drain of any service.

Run it from the repository root, then call it from another shell:

    mikros-trio run examples/starlette/main.py     # Container, service.toml beside it
    curl -s localhost:8080/notes -d 'buy ink'        # 201, the new note
    curl -s localhost:8080/notes/1                   # one note, or 404 Mikros JSON
    curl -s localhost:8080/readyz                    # probes come built in

QuartTrio is the documented way to write an HTTP service; any ASGI app that
runs on Trio is served the same way, and Starlette runs on Trio through
anyio. The container builds the app; the framework registers Mikros error
handlers on it (a ``ServiceError`` becomes its status and JSON body, any
other exception a logged 500), names calls by route template
(``/notes/{note_id}``) and runs the app's ``lifespan``: it starts before the
first request and ends after the last one has drained.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from dependency_injector import providers
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mikros_trio import NotFoundError, ServiceContainer, ValidationError

log = structlog.get_logger("notes")  # the logger feature's lines, with the service's fields


class Notebook:
    """Notes by id (a database would sit here)."""

    def __init__(self) -> None:
        self.notes: dict[int, str] = {}

    def write(self, text: str) -> int:
        if not text.strip():
            raise ValidationError("a note needs some text")
        note_id = len(self.notes) + 1
        self.notes[note_id] = text
        return note_id

    def read(self, note_id: int) -> str:
        text = self.notes.get(note_id)
        if text is None:
            raise NotFoundError(f"note {note_id} does not exist")
        return text


def create_app(notebook: Notebook) -> Starlette:
    """The Starlette app; the framework adds probes, limits and JSON errors around it."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log.info("notes serving")
        yield
        log.info("notes drained", notes=len(notebook.notes))

    async def write(request: Request) -> JSONResponse:
        note_id = notebook.write((await request.body()).decode())
        return JSONResponse({"id": note_id}, status_code=201)

    async def read(request: Request) -> JSONResponse:
        note_id = request.path_params["note_id"]
        return JSONResponse({"id": note_id, "text": notebook.read(note_id)})

    routes = [
        Route("/notes", write, methods=["POST"]),
        Route("/notes/{note_id:int}", read),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


class Container(ServiceContainer):
    notebook = providers.Singleton(Notebook)
    app = providers.Singleton(create_app, notebook=notebook)
