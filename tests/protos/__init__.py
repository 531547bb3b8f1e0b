"""Code generated from ``testsvc.proto`` for the gRPC kind's tests.

Regenerate after changing the .proto with ``nox -s codegen -- tests/protos``
(``mikros-trio codegen tests/protos --grpcio``: ``testsvc_pb2.py``/``.pyi``
messages, ``testsvc_grpc.py`` purerpc servicer and stub,
``testsvc_pb2_grpc.py`` grpcio stubs). The generated modules import each
other relatively, so ``from protos import testsvc_pb2`` is all a test needs.
"""
