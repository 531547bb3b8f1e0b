"""Listening sockets: the one place every listener of a service is opened.

In a single process this is ``trio.open_tcp_listeners`` (or anyio's, for
the gRPC kind, whose purerpc streams are anyio's). Under ``workers = N``
(:mod:`._workers`) the parent opens the sockets before any worker starts,
one set per worker slot, every set bound to the same address with
``SO_REUSEPORT``; each worker inherits its slot's set and finds it here by
the address it was configured with (``host:port`` as written, port 0
included). So:

- the kernel spreads new connections over the workers (SO_REUSEPORT hashes
  each connection to one socket of the group); with one socket shared by
  all, every worker is woken for each connection and whichever accepts
  first takes it, which spread connection-per-request load unevenly;
- a worker that dies loses only the connections it had accepted: those
  queued on its socket wait there for its replacement, which inherits the
  same socket;
- port 0 is resolved once, in the parent: every worker serves the same port;
- an address that cannot be bound fails in the parent, before any worker
  starts, with the address in the message.

An address the parent did not open (an extension kind's own listener) is
bound by the worker itself with ``SO_REUSEPORT``, so a fixed port is still
shared; port 0 then gives each worker a port of its own.
"""

from __future__ import annotations

import json
import os
import socket
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from anyio.streams.stapled import MultiListener

__all__ = ["ENV", "bind_group", "open_anyio_listener", "open_tcp_listeners"]

#: Environment variable a worker finds its inherited sockets in: JSON
#: ``{"host:port": [fd, ...]}``, keyed by the address as configured.
ENV = "MIKROS_TRIO_LISTEN"

#: Environment variable present only in a worker started by the parent (see _workers).
WORKER_ENV = "MIKROS_TRIO_WORKER"

#: Pending connections per socket; the kernel caps it at net.core.somaxconn.
BACKLOG = 0xFFFF

_inherited: dict[str, list[int]] | None = None


def address_key(host: str | None, port: int) -> str:
    """How an address is named between the parent and its workers."""
    return f"{host or ''}:{port}"


def _take_inherited(host: str | None, port: int) -> list[socket.socket] | None:
    """This worker's sockets for ``host:port``, once (a second opener binds its own)."""
    global _inherited
    if _inherited is None:
        try:
            _inherited = {
                str(k): [int(fd) for fd in v]
                for k, v in json.loads(os.environ.get(ENV, "{}")).items()
            }
        except (ValueError, TypeError, AttributeError):
            _inherited = {}
    fds = _inherited.pop(address_key(host, port), None)
    if fds is None:
        return None
    return [socket.socket(fileno=fd) for fd in fds]


def bind_group(host: str | None, port: int, *, reuse_port: bool) -> list[socket.socket]:
    """Bound, listening sockets for ``host:port``, one per address family, as trio binds them.

    Port 0 is resolved by the first socket and reused by the others, so all
    families (and, with ``reuse_port``, all later groups bound to the port
    returned) share one port. Raises ``OSError`` naming the address.
    """
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as error:
        raise OSError(error.errno, f"cannot resolve {host}: {error.strerror}") from error
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            if sockets:
                address = (*address[:1], sockets[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # As trio does: one socket per family, never a dual-stack one.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
    except OSError as error:
        for sock in sockets:
            sock.close()
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror}") from error
    return sockets


def _sockets(host: str | None, port: int) -> list[socket.socket] | None:
    """Inherited sockets, or, in a worker, its own SO_REUSEPORT ones; None: open as usual."""
    sockets = _take_inherited(host, port)
    if sockets is None and WORKER_ENV in os.environ:
        sockets = bind_group(host, port, reuse_port=True)
    return sockets


async def open_tcp_listeners(port: int, *, host: str | None = None) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners(port, host=host)``, or this worker's share of the address."""
    sockets = _sockets(host, port)
    if sockets is None:
        return await trio.open_tcp_listeners(port, host=host)
    return [trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in sockets]


async def open_anyio_listener(port: int, *, host: str | None = None) -> MultiListener[Any]:
    """``anyio.create_tcp_listener`` for ``host:port``, or this worker's share of the address."""
    import anyio
    import anyio.abc
    from anyio.streams.stapled import MultiListener

    sockets = _sockets(host, port)
    if sockets is None:
        return await anyio.create_tcp_listener(local_host=host, local_port=port)
    return MultiListener([await anyio.abc.SocketListener.from_socket(s) for s in sockets])
