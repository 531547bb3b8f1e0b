import purerpc
from . import testsvc_pb2 as testsvc__pb2
import google.protobuf.timestamp_pb2 as google_dot_protobuf_dot_timestamp__pb2


class EchoServicer(purerpc.Servicer):
    async def Unary(self, input_message):
        raise NotImplementedError()

    async def ServerStream(self, input_message):
        raise NotImplementedError()

    async def ClientStream(self, input_messages):
        raise NotImplementedError()

    async def Bidi(self, input_messages):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "mikros.testsvc.v1.Echo"
        )
        service_obj.add_method(
            "Unary",
            self.Unary,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                testsvc__pb2.EchoRequest,
                testsvc__pb2.EchoReply,
            )
        )
        service_obj.add_method(
            "ServerStream",
            self.ServerStream,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                testsvc__pb2.EchoRequest,
                testsvc__pb2.EchoReply,
            )
        )
        service_obj.add_method(
            "ClientStream",
            self.ClientStream,
            purerpc.RPCSignature(
                purerpc.Cardinality.STREAM_UNARY,
                testsvc__pb2.EchoRequest,
                testsvc__pb2.EchoReply,
            )
        )
        service_obj.add_method(
            "Bidi",
            self.Bidi,
            purerpc.RPCSignature(
                purerpc.Cardinality.STREAM_STREAM,
                testsvc__pb2.EchoRequest,
                testsvc__pb2.EchoReply,
            )
        )
        return service_obj


class EchoStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "mikros.testsvc.v1.Echo",
            channel
        )
        self.Unary = self._client.get_method_stub(
            "Unary",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                testsvc__pb2.EchoRequest,
                testsvc__pb2.EchoReply,
            )
        )
        self.ServerStream = self._client.get_method_stub(
            "ServerStream",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                testsvc__pb2.EchoRequest,
                testsvc__pb2.EchoReply,
            )
        )
        self.ClientStream = self._client.get_method_stub(
            "ClientStream",
            purerpc.RPCSignature(
                purerpc.Cardinality.STREAM_UNARY,
                testsvc__pb2.EchoRequest,
                testsvc__pb2.EchoReply,
            )
        )
        self.Bidi = self._client.get_method_stub(
            "Bidi",
            purerpc.RPCSignature(
                purerpc.Cardinality.STREAM_STREAM,
                testsvc__pb2.EchoRequest,
                testsvc__pb2.EchoReply,
            )
        )