"""Message classes for the gRPC services the framework itself serves.

``grpc.health.v1`` and server reflection (``v1alpha`` and ``v1``) are built
here from descriptors, in a descriptor pool of our own, instead of from
generated ``_pb2`` modules: generated modules register in protobuf's
default pool, where they would collide with the same files registered by
``grpcio-health-checking`` or ``grpcio-reflection`` when a process (a test,
a gateway) loads both. The wire format is what matters, and it is the same.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["HEALTH", "REFLECTION", "ProtoFile"]

_F = descriptor_pb2.FieldDescriptorProto
_STRING, _BYTES, _INT32, _ENUM, _MESSAGE = (
    _F.TYPE_STRING,
    _F.TYPE_BYTES,
    _F.TYPE_INT32,
    _F.TYPE_ENUM,
    _F.TYPE_MESSAGE,
)
_POOL = descriptor_pool.DescriptorPool()


class ProtoFile:
    """One built ``.proto`` file: its message classes by short name, and its service."""

    def __init__(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        self.package = proto.package
        self.file = _POOL.Add(proto)
        self.service_name = f"{proto.package}.{proto.service[0].name}"
        self.messages: dict[str, Any] = {}
        for message in proto.message_type:
            full = f"{proto.package}.{message.name}"
            self.messages[message.name] = message_factory.GetMessageClass(
                _POOL.FindMessageTypeByName(full)
            )

    def __getitem__(self, name: str) -> Any:
        return self.messages[name]


def _field(
    message: descriptor_pb2.DescriptorProto,
    name: str,
    number: int,
    kind: int,
    type_name: str = "",
    *,
    repeated: bool = False,
    oneof: int | None = None,
) -> None:
    field = message.field.add(
        name=name,
        number=number,
        type=kind,
        label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL,
    )
    if type_name:
        field.type_name = type_name
    if oneof is not None:
        field.oneof_index = oneof


def _health() -> ProtoFile:
    package = "grpc.health.v1"
    proto = descriptor_pb2.FileDescriptorProto(
        name="grpc/health/v1/health.proto", package=package, syntax="proto3"
    )
    request = proto.message_type.add(name="HealthCheckRequest")
    _field(request, "service", 1, _STRING)
    response = proto.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        status.value.add(name=name, number=number)
    _field(response, "status", 1, _ENUM, f".{package}.HealthCheckResponse.ServingStatus")
    service = proto.service.add(name="Health")
    req, resp = f".{package}.HealthCheckRequest", f".{package}.HealthCheckResponse"
    service.method.add(name="Check", input_type=req, output_type=resp)
    service.method.add(name="Watch", input_type=req, output_type=resp, server_streaming=True)
    return ProtoFile(proto)


def _reflection(version: str) -> ProtoFile:
    """Server reflection; ``v1alpha`` and ``v1`` differ only in their package."""
    package = f"grpc.reflection.{version}"
    proto = descriptor_pb2.FileDescriptorProto(
        name=f"grpc/reflection/{version}/reflection.proto", package=package, syntax="proto3"
    )

    def ref(name: str) -> str:
        return f".{package}.{name}"

    request = proto.message_type.add(name="ServerReflectionRequest")
    request.oneof_decl.add(name="message_request")
    _field(request, "host", 1, _STRING)
    _field(request, "file_by_filename", 3, _STRING, oneof=0)
    _field(request, "file_containing_symbol", 4, _STRING, oneof=0)
    _field(request, "file_containing_extension", 5, _MESSAGE, ref("ExtensionRequest"), oneof=0)
    _field(request, "all_extension_numbers_of_type", 6, _STRING, oneof=0)
    _field(request, "list_services", 7, _STRING, oneof=0)

    extension = proto.message_type.add(name="ExtensionRequest")
    _field(extension, "containing_type", 1, _STRING)
    _field(extension, "extension_number", 2, _INT32)

    response = proto.message_type.add(name="ServerReflectionResponse")
    response.oneof_decl.add(name="message_response")
    _field(response, "valid_host", 1, _STRING)
    _field(response, "original_request", 2, _MESSAGE, ref("ServerReflectionRequest"))
    _field(
        response, "file_descriptor_response", 4, _MESSAGE, ref("FileDescriptorResponse"), oneof=0
    )
    _field(
        response,
        "all_extension_numbers_response",
        5,
        _MESSAGE,
        ref("ExtensionNumberResponse"),
        oneof=0,
    )
    _field(response, "list_services_response", 6, _MESSAGE, ref("ListServiceResponse"), oneof=0)
    _field(response, "error_response", 7, _MESSAGE, ref("ErrorResponse"), oneof=0)

    files = proto.message_type.add(name="FileDescriptorResponse")
    _field(files, "file_descriptor_proto", 1, _BYTES, repeated=True)
    numbers = proto.message_type.add(name="ExtensionNumberResponse")
    _field(numbers, "base_type_name", 1, _STRING)
    _field(numbers, "extension_number", 2, _INT32, repeated=True)
    services = proto.message_type.add(name="ListServiceResponse")
    _field(services, "service", 1, _MESSAGE, ref("ServiceResponse"), repeated=True)
    one = proto.message_type.add(name="ServiceResponse")
    _field(one, "name", 1, _STRING)
    error = proto.message_type.add(name="ErrorResponse")
    _field(error, "error_code", 1, _INT32)
    _field(error, "error_message", 2, _STRING)

    service = proto.service.add(name="ServerReflection")
    service.method.add(
        name="ServerReflectionInfo",
        input_type=ref("ServerReflectionRequest"),
        output_type=ref("ServerReflectionResponse"),
        client_streaming=True,
        server_streaming=True,
    )
    return ProtoFile(proto)


HEALTH = _health()
REFLECTION = {version: _reflection(version) for version in ("v1alpha", "v1")}
