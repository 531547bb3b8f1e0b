"""What hostile peers cost the gRPC example: memory per idle connection, one stream flood.

Starts ``python examples/grpc/main.py`` as users do (``framework`` in
``_grpc_apps``) and measures, with raw HTTP/2 frames (hyperframe, hpack):

- memory per idle connection: RSS grown by 1,000 connections that sent the
  HTTP/2 preface and SETTINGS and nothing else, divided by 1,000;
- a stream flood: one connection opens 20,000 streams (HEADERS of a
  ``SayHello`` whose request never comes) while a grpcio neighbour calls
  ``SayHello`` on its own connection every 20 ms: the server's CPU seconds
  and RSS growth for the flood, the neighbour's worst latency during it,
  and how long after the flooder leaves the neighbour is answered within
  50 ms again.

Run it against another checkout with ``PYTHONPATH=/path/to/src``. Prints a
line per figure, then one JSON object. Run: ``python bench/grpc_hostile.py``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from typing import Any

# Run as a script, bench/ is on sys.path: the shared modules import directly.
from _grpc_apps import GRPC_OPTIONS, GrpcServer, _greeter_modules, cpu_seconds, framework, free_port

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
IDLE = 1000
STREAMS = 20_000


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def settle(pid: int) -> int:
    """RSS once it stops moving (the server has read what was sent)."""
    last = rss_kib(pid)
    for _ in range(50):
        time.sleep(0.1)
        now = rss_kib(pid)
        if now == last:
            return now
        last = now
    return last


def handshake(port: int) -> socket.socket:
    from hyperframe.frame import SettingsFrame

    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    sock.sendall(PREFACE + SettingsFrame(0).serialize())
    return sock


def idle_memory(port: int, pid: int) -> float:
    before = settle(pid)
    socks = [handshake(port) for _ in range(IDLE)]
    try:
        after = settle(pid)
    finally:
        for sock in socks:
            sock.close()
    return (after - before) / IDLE


class Neighbour(threading.Thread):
    """A grpcio client calling SayHello every 20 ms; keeps (time, latency) of each call."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        import grpc

        pb2, pb2_grpc = _greeter_modules()
        with grpc.insecure_channel(f"127.0.0.1:{self.port}", options=GRPC_OPTIONS) as channel:
            stub = pb2_grpc.GreeterStub(channel)
            while not self.stop.is_set():
                sent = time.perf_counter()
                with contextlib.suppress(grpc.RpcError):  # counted by its latency
                    stub.SayHello(pb2.HelloRequest(name="n"), timeout=30)
                self.samples.append((sent, time.perf_counter() - sent))
                time.sleep(0.02)


def stream_flood(port: int, pid: int) -> dict[str, Any]:
    from hpack import Encoder
    from hyperframe.frame import HeadersFrame

    neighbour = Neighbour(port)
    neighbour.start()
    time.sleep(0.5)
    encoder = Encoder()
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/greeter.Greeter/SayHello"),
        (":authority", "t"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    before_rss, before_cpu = settle(pid), cpu_seconds(pid) or 0.0
    sock = handshake(port)
    started = time.perf_counter()
    burst = b"".join(
        HeadersFrame(n, encoder.encode(headers), flags=["END_HEADERS"]).serialize()
        for n in range(1, 2 * STREAMS, 2)
    )
    reader = threading.Thread(target=lambda: _drain(sock), daemon=True)
    reader.start()
    sock.sendall(burst)
    time.sleep(2.0)
    flood_rss = rss_kib(pid)
    sock.close()
    left = time.perf_counter()
    deadline = left + 30
    while time.perf_counter() < deadline:
        recent = [lat for at, lat in neighbour.samples if at > left]
        if len(recent) >= 3 and all(lat < 0.05 for lat in recent[-3:]):
            break
        time.sleep(0.05)
    neighbour.stop.set()
    neighbour.join(30)
    during = [lat for at, lat in neighbour.samples if started <= at <= left]
    after = [(at, lat) for at, lat in neighbour.samples if at > left]
    recovered = next((at - left for at, lat in after if lat < 0.05), None)
    return {
        "flood_cpu_s": round((cpu_seconds(pid) or 0.0) - before_cpu, 2),
        "flood_rss_mib": round((flood_rss - before_rss) / 1024, 1),
        "neighbour_worst_ms_during": round(max(during, default=0.0) * 1000, 1),
        "neighbour_ok_again_after_s": None if recovered is None else round(recovered, 2),
    }


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(1 << 20):
            pass
    except OSError:
        pass


def main() -> None:
    port = free_port()
    server = GrpcServer(framework(port))
    try:
        server.wait_ready()
        per_idle = idle_memory(port, server.proc.pid)
        print(f"memory per idle connection: {per_idle:.1f} KiB ({IDLE} connections)")
        flood = stream_flood(port, server.proc.pid)
        print(f"one connection opening {STREAMS} streams: {flood}")
    finally:
        server.close()
    print(json.dumps({"benchmark": "grpc_hostile", "idle_kib": round(per_idle, 1), **flood}))


if __name__ == "__main__":
    main()
