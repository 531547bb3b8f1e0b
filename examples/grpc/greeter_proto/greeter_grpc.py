import purerpc
from . import greeter_pb2 as greeter__pb2


class GreeterServicer(purerpc.Servicer):
    async def SayHello(self, input_message):
        raise NotImplementedError()

    async def SayHelloStream(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "greeter.Greeter"
        )
        service_obj.add_method(
            "SayHello",
            self.SayHello,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                greeter__pb2.HelloRequest,
                greeter__pb2.HelloReply,
            )
        )
        service_obj.add_method(
            "SayHelloStream",
            self.SayHelloStream,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                greeter__pb2.HelloStreamRequest,
                greeter__pb2.HelloReply,
            )
        )
        return service_obj


class GreeterStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "greeter.Greeter",
            channel
        )
        self.SayHello = self._client.get_method_stub(
            "SayHello",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                greeter__pb2.HelloRequest,
                greeter__pb2.HelloReply,
            )
        )
        self.SayHelloStream = self._client.get_method_stub(
            "SayHelloStream",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                greeter__pb2.HelloStreamRequest,
                greeter__pb2.HelloReply,
            )
        )