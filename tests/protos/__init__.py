"""Code generated from ``testsvc.proto`` for the gRPC kind's tests.

Regenerate after changing the .proto with ``nox -s codegen -- tests/protos``
(grpcio-tools with purerpc's plugin: ``testsvc_pb2.py``/``.pyi`` messages,
``testsvc_grpc.py`` purerpc servicer and stub, ``testsvc_pb2_grpc.py``
grpcio stubs).

The generated modules import each other by their top-level names
(``import testsvc_pb2``), so this directory goes on ``sys.path`` and the
modules are re-exported from here: ``from protos import testsvc_pb2``
gives the one and only module object (importing it twice under two names
would register ``testsvc.proto`` twice in protobuf's default pool).
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import testsvc_grpc  # noqa: E402  (needs the path above)
import testsvc_pb2  # noqa: E402
import testsvc_pb2_grpc  # noqa: E402

__all__ = ["testsvc_grpc", "testsvc_pb2", "testsvc_pb2_grpc"]
