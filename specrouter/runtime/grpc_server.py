"""A gRPC server on an event-loop thread of its own: the data plane of every model actor and the public
gRPC API both run on it. Imports neither torch nor the models, so the serving face stays light."""

from __future__ import annotations

import asyncio
import threading

import grpc

from specrouter.v1 import worker_pb2_grpc


async def start_server(servicer, host: str = "127.0.0.1", port: int = 0, add=worker_pb2_grpc.add_WorkerServicer_to_server,
                       interceptors: tuple = (), max_message_bytes: int = 64 << 20) -> tuple[grpc.aio.Server, str]:
    """Start an asyncio gRPC server for `servicer` on the running loop; returns it and its address.
    `max_message_bytes` bounds the messages it receives (a larger one fails with RESOURCE_EXHAUSTED)."""
    # so_reuseport off: a port another server listens on is refused, not silently shared with it
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.max_receive_message_length", max_message_bytes),
                                                                 ("grpc.max_send_message_length", 64 << 20),
                                                                 ("grpc.so_reuseport", 0)])
    add(servicer, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:  # grpcio raises on a port it cannot bind
        raise OSError(f"cannot bind a gRPC server to {host}:{port}: is the port in use?") from exc
    await server.start()
    return server, f"{host}:{bound}"


class BackgroundServer:
    """Runs a gRPC server on its own event-loop thread (a worker's data plane by default; `add`
    registers another service, e.g. the public API)."""

    def __init__(self, servicer, host: str = "127.0.0.1", port: int = 0, add=worker_pb2_grpc.add_WorkerServicer_to_server,
                 interceptors: tuple = (), max_message_bytes: int = 64 << 20):
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True, name="grpc-server").start()
        start = start_server(servicer, host, port, add, interceptors, max_message_bytes)
        self._server, self.address = asyncio.run_coroutine_threadsafe(start, self._loop).result(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(grace=None), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
