"""The gRPC services the server itself provides: health and reflection.

Used by :mod:`mikros_trio.grpc` only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import purerpc
from purerpc.grpclib.exceptions import (
    RpcFailedError,
)
from purerpc.grpclib.status import Status, StatusCode
from purerpc.rpc import Cardinality, RPCSignature

from ._component import Lifetime
from ._grpc_proto import HEALTH, REFLECTION
from ._health import Health

__all__ = ["HealthService", "ReflectionService"]


class HealthService:
    """``grpc.health.v1.Health`` over the supervisor's health state."""

    def __init__(self, health: Health, lifetime: Lifetime, names: Iterable[str]) -> None:
        self._health = health
        self._lifetime = lifetime
        self._names = {"", *names}
        self._response = HEALTH["HealthCheckResponse"]

    def _status(self, service: str) -> int:
        statuses = self._response.ServingStatus
        if service not in self._names:
            return int(statuses.Value("SERVICE_UNKNOWN"))
        return int(statuses.Value("SERVING" if self._health.ready else "NOT_SERVING"))

    async def check(self, request: Any) -> Any:
        status = self._status(request.service)
        if status == self._response.ServingStatus.Value("SERVICE_UNKNOWN"):
            raise RpcFailedError(
                Status(StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
            )
        return self._response(status=status)

    async def watch(self, request: Any) -> AsyncIterator[Any]:
        # Ends when this server starts draining: a watch is not work to
        # wait for, and the last status it sent was NOT_SERVING.
        version = self._health.version
        last = self._status(request.service)
        yield self._response(status=last)
        while not self._lifetime.stopping:
            version = await self._health.wait_changed(version)
            status = self._status(request.service)
            if status != last:
                last = status
                yield self._response(status=status)

    def service(self) -> purerpc.Service:
        service = purerpc.Service(HEALTH.service_name)
        request, response = HEALTH["HealthCheckRequest"], HEALTH["HealthCheckResponse"]
        service.add_method(
            "Check", self.check, RPCSignature(Cardinality.UNARY_UNARY, request, response)
        )
        service.add_method(
            "Watch", self.watch, RPCSignature(Cardinality.UNARY_STREAM, request, response)
        )
        return service


class ReflectionService:
    """Server reflection: lists services and serves their file descriptors."""

    def __init__(self, services: dict[str, purerpc.Service]) -> None:
        self._services = services
        self._files: dict[str, Any] = {}  # file name → FileDescriptor
        self._symbols: dict[str, Any] = {}
        for service in services.values():
            for method in service.methods.values():
                for message in (method.signature.request_type, method.signature.response_type):
                    descriptor = getattr(message, "DESCRIPTOR", None)
                    if descriptor is not None:
                        self._add_file(descriptor.file)
                        self._symbols.setdefault(service.name, descriptor.file)
        for proto in (HEALTH, *REFLECTION.values()):
            self._add_file(proto.file)
            self._symbols[proto.service_name] = proto.file

    def _add_file(self, file: Any) -> None:
        if file.name in self._files:
            return
        self._files[file.name] = file
        for message in file.message_types_by_name.values():
            self._symbols[message.full_name] = file
        for enum in file.enum_types_by_name.values():
            self._symbols[enum.full_name] = file
        for service in file.services_by_name.values():
            self._symbols[service.full_name] = file
            for method in service.methods:
                self._symbols[method.full_name] = file
        for dependency in file.dependencies:
            self._add_file(dependency)

    def _with_dependencies(self, file: Any) -> list[bytes]:
        out: list[bytes] = []
        seen: set[str] = set()
        stack = [file]
        while stack:
            current = stack.pop()
            if current.name in seen:
                continue
            seen.add(current.name)
            out.append(current.serialized_pb)
            stack.extend(current.dependencies)
        return out

    def _answer(self, messages: Any, request: Any) -> Any:
        response = messages["ServerReflectionResponse"](
            valid_host=request.host, original_request=request
        )
        which = request.WhichOneof("message_request")
        file = None
        if which == "list_services":
            names = sorted(self._services)
            response.list_services_response.service.extend(
                messages["ServiceResponse"](name=name) for name in names
            )
            return response
        if which == "file_by_filename":
            file = self._files.get(request.file_by_filename)
        elif which == "file_containing_symbol":
            file = self._symbols.get(request.file_containing_symbol)
        if file is None:
            response.error_response.error_code = StatusCode.NOT_FOUND.value
            response.error_response.error_message = f"not found: {which}"
            return response
        response.file_descriptor_response.file_descriptor_proto.extend(
            self._with_dependencies(file)
        )
        return response

    def service(self, version: str) -> purerpc.Service:
        proto = REFLECTION[version]
        messages = proto.messages

        async def info(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for request in requests:
                yield self._answer(messages, request)

        service = purerpc.Service(proto.service_name)
        service.add_method(
            "ServerReflectionInfo",
            info,
            RPCSignature(
                Cardinality.STREAM_STREAM,
                messages["ServerReflectionRequest"],
                messages["ServerReflectionResponse"],
            ),
        )
        return service
